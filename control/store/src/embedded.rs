//! The default backend: one redb file on local disk.
//!
//! Every write is one redb transaction committed with `Durability::Immediate` (fsync before
//! the commit returns), so a write that was acknowledged survives `kill -9` and power loss.
//! Tables: `objects` (key → revisions + value), `events` (revision → change, the watch history,
//! trimmed by compaction) and `meta` (current and compacted revision). Watchers read history
//! from `events` and wait on an in-process notification for new revisions, so none can miss or
//! repeat an event. redb locks the file: a second process opening it gets a clear error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{ConfigStore, Error, EventKind, EventStream, KvEntry, KvEvent, Result, Revision};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
const COMPACTED: &str = "compacted";

/// How many revisions of history are kept for watchers by default.
pub const DEFAULT_HISTORY: u64 = 100_000;
/// Events read per history batch.
const WATCH_BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    path: PathBuf,
    history: u64,
    notify: watch::Sender<Revision>,
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("embedded store {}: {e}", path.display()))
}

impl EmbeddedStore {
    /// Opens (or creates) the store file, creating its directory.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_history(path, DEFAULT_HISTORY)
    }

    /// Like [`EmbeddedStore::open`], keeping `history` revisions of watch history.
    pub fn open_with_history(path: &Path, history: u64) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable(path, format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => unavailable(
                path,
                "already open by another process (is another trellis-control using this data directory?)",
            ),
            other => unavailable(path, other),
        })?;
        Self::init(db, path.to_path_buf(), history)
    }

    /// Opens a store on any redb storage backend (`label` names it in errors). Tests use this
    /// with [`crate::testing::PowerLossDisk`] to prove that acknowledged writes are durable.
    pub fn open_with_backend(backend: impl redb::StorageBackend, label: &str) -> Result<Self> {
        let path = PathBuf::from(label);
        let db = Database::builder().create_with_backend(backend).map_err(|e| unavailable(&path, e))?;
        Self::init(db, path, DEFAULT_HISTORY)
    }

    fn init(db: Database, path: PathBuf, history: u64) -> Result<Self> {
        let txn = db.begin_write().map_err(|e| unavailable(&path, e))?;
        let revision = {
            txn.open_table(OBJECTS).map_err(|e| unavailable(&path, e))?;
            txn.open_table(EVENTS).map_err(|e| unavailable(&path, e))?;
            let meta = txn.open_table(META).map_err(|e| unavailable(&path, e))?;
            meta.get(REVISION).map_err(|e| unavailable(&path, e))?.map(|g| g.value()).unwrap_or(0)
        };
        txn.commit().map_err(|e| unavailable(&path, e))?;
        let (notify, _) = watch::channel(revision as Revision);
        Ok(Self { inner: Arc::new(Inner { db, path, history, notify }) })
    }

    /// Runs a blocking closure on the store off the async runtime.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Unavailable(format!("embedded store task failed: {e}")))?
    }

    /// Runs one write: `op` sees the current entry of `key` and decides what to do.
    async fn write(
        &self,
        key: &str,
        op: impl FnOnce(Option<KvEntry>) -> Result<Write> + Send + 'static,
    ) -> Result<(Revision, Option<KvEntry>)> {
        let key = key.to_string();
        let (rev, prev) = self.blocking(move |inner| inner.write(&key, op)).await?;
        // Concurrent writers may finish out of order: only ever move the notification forward.
        self.inner.notify.send_if_modified(|current| {
            let newer = rev > *current;
            if newer {
                *current = rev;
            }
            newer
        });
        Ok((rev, prev))
    }
}

/// What a write does to its key.
enum Write {
    Put(Vec<u8>),
    Delete,
}

fn encode_entry(create: Revision, modified: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create.to_be_bytes());
    out.extend_from_slice(&modified.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_entry(key: &str, raw: &[u8]) -> Result<KvEntry> {
    if raw.len() < 16 {
        return Err(Error::Corrupt(format!("entry {key} is {} bytes, shorter than its header", raw.len())));
    }
    let create = i64::from_be_bytes(raw[0..8].try_into().unwrap_or_default());
    let modified = i64::from_be_bytes(raw[8..16].try_into().unwrap_or_default());
    Ok(KvEntry { key: key.to_string(), value: raw[16..].to_vec(), create_revision: create, mod_revision: modified })
}

fn encode_event(kind: EventKind, entry: &KvEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + entry.key.len() + entry.value.len());
    out.push(match kind {
        EventKind::Put => 0,
        EventKind::Delete => 1,
    });
    out.extend_from_slice(&entry.create_revision.to_be_bytes());
    out.extend_from_slice(&(entry.key.len() as u32).to_be_bytes());
    out.extend_from_slice(entry.key.as_bytes());
    out.extend_from_slice(&entry.value);
    out
}

fn decode_event(revision: u64, raw: &[u8]) -> Result<KvEvent> {
    let corrupt = || Error::Corrupt(format!("history event {revision} is malformed"));
    if raw.len() < 13 {
        return Err(corrupt());
    }
    let kind = match raw[0] {
        0 => EventKind::Put,
        1 => EventKind::Delete,
        _ => return Err(corrupt()),
    };
    let create = i64::from_be_bytes(raw[1..9].try_into().map_err(|_| corrupt())?);
    let key_len = u32::from_be_bytes(raw[9..13].try_into().map_err(|_| corrupt())?) as usize;
    let key_end = 13usize.checked_add(key_len).filter(|e| *e <= raw.len()).ok_or_else(corrupt)?;
    let key = std::str::from_utf8(&raw[13..key_end]).map_err(|_| corrupt())?.to_string();
    Ok(KvEvent {
        kind,
        entry: KvEntry {
            key,
            value: raw[key_end..].to_vec(),
            create_revision: create,
            mod_revision: revision as Revision,
        },
    })
}

impl Inner {
    fn err(&self, e: impl std::fmt::Display) -> Error {
        unavailable(&self.path, e)
    }

    fn write(
        &self,
        key: &str,
        op: impl FnOnce(Option<KvEntry>) -> Result<Write>,
    ) -> Result<(Revision, Option<KvEntry>)> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate).map_err(|e| self.err(e))?;
        let result = {
            let mut objects = txn.open_table(OBJECTS).map_err(|e| self.err(e))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let current = meta.get(REVISION).map_err(|e| self.err(e))?.map(|g| g.value()).unwrap_or(0);
            let existing = match objects.get(key).map_err(|e| self.err(e))? {
                Some(raw) => Some(decode_entry(key, raw.value())?),
                None => None,
            };
            let rev = current + 1;
            let action = op(existing.clone())?;
            match action {
                Write::Put(value) => {
                    let create = existing.as_ref().map(|e| e.create_revision).unwrap_or(rev as Revision);
                    objects
                        .insert(key, encode_entry(create, rev as Revision, &value).as_slice())
                        .map_err(|e| self.err(e))?;
                    let entry =
                        KvEntry { key: key.to_string(), value, create_revision: create, mod_revision: rev as Revision };
                    events.insert(rev, encode_event(EventKind::Put, &entry).as_slice()).map_err(|e| self.err(e))?;
                }
                Write::Delete => {
                    let Some(prev) = existing.as_ref() else {
                        return Err(Error::NotFound { key: key.to_string() });
                    };
                    objects.remove(key).map_err(|e| self.err(e))?;
                    events.insert(rev, encode_event(EventKind::Delete, prev).as_slice()).map_err(|e| self.err(e))?;
                }
            }
            meta.insert(REVISION, rev).map_err(|e| self.err(e))?;
            // Trim history in steps so that most writes do not pay for it.
            let compacted = meta.get(COMPACTED).map_err(|e| self.err(e))?.map(|g| g.value()).unwrap_or(0);
            if rev > compacted + self.history + self.history / 8 + 1 {
                let upto = rev - self.history;
                events.retain_in(..=upto, |_, _| false).map_err(|e| self.err(e))?;
                meta.insert(COMPACTED, upto).map_err(|e| self.err(e))?;
            }
            (rev as Revision, existing)
        };
        txn.commit().map_err(|e| self.err(format!("commit failed: {e}")))?;
        Ok(result)
    }

    fn meta(&self, txn: &redb::ReadTransaction) -> Result<(Revision, Revision)> {
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let rev = meta.get(REVISION).map_err(|e| self.err(e))?.map(|g| g.value()).unwrap_or(0);
        let compacted = meta.get(COMPACTED).map_err(|e| self.err(e))?.map(|g| g.value()).unwrap_or(0);
        Ok((rev as Revision, compacted as Revision))
    }

    /// Up to `WATCH_BATCH` events after `after`, those under `prefix` kept; also the highest
    /// revision looked at, so the watcher can move past events for other prefixes.
    fn events_after(&self, prefix: &str, after: Revision) -> Result<(Vec<KvEvent>, Revision)> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let (_, compacted) = self.meta(&txn)?;
        if after < compacted {
            return Err(Error::Compacted { requested: after + 1, compacted });
        }
        let events = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut last = after;
        for item in events.range((after + 1) as u64..).map_err(|e| self.err(e))?.take(WATCH_BATCH) {
            let (rev, raw) = item.map_err(|e| self.err(e))?;
            let ev = decode_event(rev.value(), raw.value())?;
            last = ev.revision();
            if ev.entry.key.starts_with(prefix) {
                out.push(ev);
            }
        }
        Ok((out, last))
    }
}

#[async_trait]
impl ConfigStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(|e| inner.err(e))?;
            let objects = txn.open_table(OBJECTS).map_err(|e| inner.err(e))?;
            match objects.get(key.as_str()).map_err(|e| inner.err(e))? {
                Some(raw) => Ok(Some(decode_entry(&key, raw.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision)> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(|e| inner.err(e))?;
            let (rev, _) = inner.meta(&txn)?;
            let objects = txn.open_table(OBJECTS).map_err(|e| inner.err(e))?;
            let mut out = Vec::new();
            for item in objects.range(prefix.as_str()..).map_err(|e| inner.err(e))? {
                let (k, v) = item.map_err(|e| inner.err(e))?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push(decode_entry(k.value(), v.value())?);
            }
            Ok((out, rev))
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let k = key.to_string();
        let (rev, _) = self
            .write(key, move |existing| match existing {
                Some(_) => Err(Error::AlreadyExists { key: k }),
                None => Ok(Write::Put(value)),
            })
            .await?;
        Ok(rev)
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Option<Revision>) -> Result<Revision> {
        let k = key.to_string();
        let (rev, _) =
            self.write(key, move |existing| check(&k, existing.as_ref(), expected).map(|_| Write::Put(value))).await?;
        Ok(rev)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(KvEntry, Revision)> {
        let k = key.to_string();
        let (rev, prev) =
            self.write(key, move |existing| check(&k, existing.as_ref(), expected).map(|_| Write::Delete)).await?;
        let prev = prev.ok_or_else(|| Error::NotFound { key: key.to_string() })?;
        Ok((KvEntry { mod_revision: rev, ..prev }, rev))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream> {
        // Fail fast on a compacted revision, before handing out a stream.
        let p = prefix.to_string();
        let (first, mut last) = self.blocking(move |inner| inner.events_after(&p, after)).await?;
        let (tx, rx) = mpsc::channel(WATCH_BATCH);
        let store = self.clone();
        let prefix = prefix.to_string();
        let mut changes = self.inner.notify.subscribe();
        tokio::spawn(async move {
            let mut batch = first;
            loop {
                let scanned_to = last;
                for ev in batch.drain(..) {
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                // Wait until something newer than what we scanned exists.
                if *changes.borrow_and_update() <= scanned_to {
                    tokio::select! {
                        _ = tx.closed() => return,
                        r = changes.wait_for(|r| *r > scanned_to) => if r.is_err() { return },
                    }
                }
                let p = prefix.clone();
                match store.blocking(move |inner| inner.events_after(&p, scanned_to)).await {
                    Ok((events, to)) => {
                        batch = events;
                        last = to;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(|e| inner.err(e))?;
            Ok(inner.meta(&txn)?.0)
        })
        .await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.blocking(move |inner| {
            let mut txn = inner.db.begin_write().map_err(|e| inner.err(e))?;
            txn.set_durability(Durability::Immediate).map_err(|e| inner.err(e))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| inner.err(e))?;
                let current = meta.get(REVISION).map_err(|e| inner.err(e))?.map(|g| g.value()).unwrap_or(0) as Revision;
                if revision > current {
                    return Err(Error::Invalid(format!(
                        "cannot compact to {revision}: the store is at revision {current}"
                    )));
                }
                let compacted =
                    meta.get(COMPACTED).map_err(|e| inner.err(e))?.map(|g| g.value()).unwrap_or(0) as Revision;
                if revision <= compacted {
                    return Ok(());
                }
                let mut events = txn.open_table(EVENTS).map_err(|e| inner.err(e))?;
                events.retain_in(..=(revision as u64), |_, _| false).map_err(|e| inner.err(e))?;
                meta.insert(COMPACTED, revision as u64).map_err(|e| inner.err(e))?;
            }
            txn.commit().map_err(|e| inner.err(e))?;
            Ok(())
        })
        .await
    }
}

/// The precondition shared by update and delete: the key exists and, if asked, is unchanged.
fn check(key: &str, existing: Option<&KvEntry>, expected: Option<Revision>) -> Result<()> {
    match (existing, expected) {
        (None, _) => Err(Error::NotFound { key: key.to_string() }),
        (Some(e), Some(want)) if e.mod_revision != want => {
            Err(Error::Conflict { key: key.to_string(), expected: want, current: e.mod_revision })
        }
        _ => Ok(()),
    }
}
