//! Typed access: [`Resource`]s in a [`ConfigStore`].
//!
//! Values are the resource's JSON without `resourceVersion` (which is the store revision and
//! is filled in on every read). `uid`, `creationTimestamp` and `generation` are set here, the
//! way the Kubernetes API server sets them.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use trellis_model::{Kind, Resource, ResourceKey};

use crate::{ConfigStore, Error, EventKind, KvEntry, MAX_VALUE_BYTES, Result, Revision};

/// A store of resources over any backend.
#[derive(Debug, Clone)]
pub struct ResourceStore {
    kv: Arc<dyn ConfigStore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    /// The Kubernetes watch event name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// A change to one resource. `object.metadata.resourceVersion` is the revision of the change.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub event_type: EventType,
    pub revision: Revision,
    pub object: Resource,
}

/// Keys of content-addressed blobs (wasm modules), never resources: `blobs/wasm/SHA256/meta`
/// (the size and chunk count, written last) and `blobs/wasm/SHA256/NNNNNN` (chunks).
pub const BLOB_PREFIX: &str = "blobs/";

/// Bytes per stored chunk of a blob (well under etcd's request limit).
const CHUNK: usize = 256 << 10;

/// Keys of the control plane's own state that is not configuration (the CA's root, written
/// once): `private/NAME`. Never listed, watched or served by the config API.
pub const PRIVATE_PREFIX: &str = "private/";

/// Whether a key is a resource's (not a blob's or the control plane's own).
fn is_resource(key: &str) -> bool {
    !key.starts_with(BLOB_PREFIX) && !key.starts_with(PRIVATE_PREFIX)
}

/// The key prefix selecting a kind (all kinds when `None`) and optionally one namespace.
pub fn prefix(kind: Option<Kind>, namespace: Option<&str>) -> String {
    match kind {
        Some(k) => ResourceKey::namespace_prefix(k, namespace),
        None => String::new(),
    }
}

fn decode(entry: &KvEntry, revision: Revision) -> Result<Resource> {
    let mut res: Resource =
        serde_json::from_slice(&entry.value).map_err(|e| Error::Corrupt(format!("{}: {e}", entry.key)))?;
    res.metadata.resource_version = Some(revision.to_string());
    Ok(res)
}

fn encode(res: &Resource) -> Result<Vec<u8>> {
    let mut stored = res.clone();
    stored.metadata.resource_version = None;
    let bytes = serde_json::to_vec(&stored).map_err(|e| Error::Invalid(format!("cannot encode resource: {e}")))?;
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(Error::Invalid(format!(
            "{} bytes is over the {MAX_VALUE_BYTES}-byte limit for one resource",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Parses `metadata.resourceVersion` as a revision.
pub fn parse_resource_version(rv: &str) -> Result<Revision> {
    rv.parse::<Revision>().ok().filter(|r| *r > 0).ok_or_else(|| {
        Error::Invalid(format!("metadata.resourceVersion {rv:?} is not a resourceVersion issued by this store"))
    })
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

impl ResourceStore {
    pub fn new(kv: Arc<dyn ConfigStore>) -> Self {
        Self { kv }
    }

    /// The backend underneath.
    pub fn kv(&self) -> &Arc<dyn ConfigStore> {
        &self.kv
    }

    pub async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>> {
        match self.kv.get(&key.storage_key()).await? {
            Some(e) => Ok(Some(decode(&e, e.mod_revision)?)),
            None => Ok(None),
        }
    }

    /// Resources of a kind (every kind when `None`), in one namespace or all, sorted by key,
    /// with the revision to watch from.
    pub async fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> Result<(Vec<Resource>, Revision)> {
        let (entries, rev) = self.kv.list(&prefix(kind, namespace)).await?;
        let items = entries
            .iter()
            .filter(|e| is_resource(&e.key))
            .map(|e| decode(e, e.mod_revision))
            .collect::<Result<Vec<_>>>()?;
        Ok((items, rev))
    }

    /// Creates a resource; `AlreadyExists` if its key is taken. The caller has validated it.
    pub async fn create(&self, key: &ResourceKey, res: &Resource) -> Result<Resource> {
        let mut res = res.clone();
        res.metadata.namespace = (!key.namespace.is_empty()).then(|| key.namespace.clone());
        res.metadata.uid = Some(new_uid());
        res.metadata.creation_timestamp = Some(crate::time::now_rfc3339());
        res.metadata.generation = Some(1);
        let rev = self.kv.create(&key.storage_key(), encode(&res)?).await?;
        res.metadata.resource_version = Some(rev.to_string());
        Ok(res)
    }

    /// Replaces a resource. If `res.metadata.resourceVersion` is set, only when it is still
    /// current (`Conflict` otherwise); without it, unconditionally. Server-set metadata (uid,
    /// creationTimestamp) is kept; `generation` grows when the spec changes.
    pub async fn update(&self, key: &ResourceKey, res: &Resource) -> Result<Resource> {
        let expected = res.metadata.resource_version.as_deref().map(parse_resource_version).transpose()?;
        let skey = key.storage_key();
        loop {
            let current = self.kv.get(&skey).await?.ok_or_else(|| Error::NotFound { key: key.to_string() })?;
            if let Some(want) = expected
                && want != current.mod_revision
            {
                return Err(Error::Conflict { key: key.to_string(), expected: want, current: current.mod_revision });
            }
            let old = decode(&current, current.mod_revision)?;
            let mut new = res.clone();
            new.metadata.namespace = (!key.namespace.is_empty()).then(|| key.namespace.clone());
            new.metadata.uid = old.metadata.uid.clone();
            new.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
            let generation = old.metadata.generation.unwrap_or(1);
            new.metadata.generation = Some(if old.spec == new.spec { generation } else { generation + 1 });
            match self.kv.update(&skey, encode(&new)?, Some(current.mod_revision)).await {
                Ok(rev) => {
                    new.metadata.resource_version = Some(rev.to_string());
                    return Ok(new);
                }
                // Someone wrote in between: with no precondition from the caller, try again.
                Err(Error::Conflict { .. }) if expected.is_none() => continue,
                Err(Error::Conflict { current: now, .. }) => {
                    return Err(Error::Conflict { key: key.to_string(), expected: current.mod_revision, current: now });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes a resource, conditionally on `expected` if given. Returns it as it was, with the
    /// revision of the deletion.
    pub async fn delete(&self, key: &ResourceKey, expected: Option<Revision>) -> Result<Resource> {
        let (entry, rev) = self.kv.delete(&key.storage_key(), expected).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::NotFound { key: key.to_string() },
            Error::Conflict { expected, current, .. } => Error::Conflict { key: key.to_string(), expected, current },
            other => other,
        })?;
        decode(&entry, rev)
    }

    /// Changes after `after` to resources of a kind (or all kinds), in a namespace or all.
    pub async fn watch(
        &self,
        kind: Option<Kind>,
        namespace: Option<&str>,
        after: Revision,
    ) -> Result<impl Stream<Item = Result<WatchEvent>> + Send + 'static> {
        let events = self.kv.watch(&prefix(kind, namespace), after).await?;
        Ok(events.filter_map(|item| {
            futures::future::ready((|| {
                let ev = match item {
                    Ok(ev) => ev,
                    Err(e) => return Some(Err(e)),
                };
                if !is_resource(&ev.entry.key) {
                    return None;
                }
                let rev = ev.revision();
                let event_type = match ev.kind {
                    EventKind::Delete => EventType::Deleted,
                    EventKind::Put if ev.entry.create_revision == rev => EventType::Added,
                    EventKind::Put => EventType::Modified,
                };
                Some(decode(&ev.entry, rev).map(|object| WatchEvent { event_type, revision: rev, object }))
            })())
        }))
    }

    /// Stores a wasm module under its sha256 (hex), in chunks, the metadata last so that a
    /// module is visible only once whole. Storing one that is there already changes nothing.
    /// Returns the sha256 and whether it was new.
    pub async fn put_module(&self, sha256: &str, bytes: &[u8]) -> Result<bool> {
        let base = format!("{BLOB_PREFIX}wasm/{sha256}/");
        if self.kv.get(&format!("{base}meta")).await?.is_some() {
            return Ok(false);
        }
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
        for (i, c) in chunks.iter().enumerate() {
            let key = format!("{base}{i:06}");
            match self.kv.create(&key, c.to_vec()).await {
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let meta = serde_json::json!({"size": bytes.len(), "chunks": chunks.len()}).to_string().into_bytes();
        match self.kv.create(&format!("{base}meta"), meta).await {
            Ok(_) => Ok(true),
            Err(Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A stored module's bytes (`None`: not stored, or stored only in part).
    pub async fn get_module(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let base = format!("{BLOB_PREFIX}wasm/{sha256}/");
        let Some(meta) = self.kv.get(&format!("{base}meta")).await? else { return Ok(None) };
        let meta: serde_json::Value =
            serde_json::from_slice(&meta.value).map_err(|e| Error::Corrupt(format!("{base}meta: {e}")))?;
        let (size, n) = (meta["size"].as_u64().unwrap_or(0) as usize, meta["chunks"].as_u64().unwrap_or(0) as usize);
        let mut out = Vec::with_capacity(size);
        for i in 0..n {
            let c = self
                .kv
                .get(&format!("{base}{i:06}"))
                .await?
                .ok_or_else(|| Error::Corrupt(format!("{base}: chunk {i} of {n} is missing")))?;
            out.extend_from_slice(&c.value);
        }
        if out.len() != size {
            return Err(Error::Corrupt(format!("{base}: {} bytes stored, {size} expected", out.len())));
        }
        Ok(Some(out))
    }

    /// Stored modules: (sha256, size).
    pub async fn list_modules(&self) -> Result<Vec<(String, u64)>> {
        let (entries, _) = self.kv.list(&format!("{BLOB_PREFIX}wasm/")).await?;
        Ok(entries
            .iter()
            .filter_map(|e| {
                let sha = e.key.strip_prefix(&format!("{BLOB_PREFIX}wasm/"))?.strip_suffix("/meta")?;
                let meta: serde_json::Value = serde_json::from_slice(&e.value).ok()?;
                Some((sha.to_string(), meta["size"].as_u64().unwrap_or(0)))
            })
            .collect())
    }

    pub async fn current_revision(&self) -> Result<Revision> {
        self.kv.current_revision().await
    }

    /// Stores the control plane's own value `name` if it is not there yet (the first replica
    /// to start wins; the others read its value). Returns the value stored under `name`.
    pub async fn create_private(&self, name: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        let key = format!("{PRIVATE_PREFIX}{name}");
        match self.kv.create(&key, value.clone()).await {
            Ok(_) => Ok(value),
            Err(Error::AlreadyExists { .. }) => {
                Ok(self.kv.get(&key).await?.ok_or_else(|| Error::Corrupt(format!("{key} vanished")))?.value)
            }
            Err(e) => Err(e),
        }
    }
}
