//! Trellis's configuration store.
//!
//! One trait, [`ConfigStore`]: revisioned get / list / create / update (compare-and-swap on the
//! revision) / delete, and watch from a revision, over opaque values under string keys. Two
//! backends implement it: [`embedded::EmbeddedStore`] (the default: a redb file, every
//! acknowledged write fsynced) and [`etcd::EtcdStore`] (etcd v3, etcd's own revisions). On top,
//! [`ResourceStore`] stores [`trellis_model::Resource`]s: it fills in `resourceVersion`, `uid`,
//! `creationTimestamp` and `generation`, and [`reflector`] turns list + watch into a stream that
//! never loses or repeats an event and relists when its revision has been compacted.
//!
//! This crate is the only one that talks to etcd. It does not validate resources: callers do.

use std::fmt;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub mod embedded;
pub mod etcd;
pub mod reflector;
mod resources;
pub mod testing;
mod time;

pub use reflector::{ReflectorEvent, reflector, reflector_from};
pub use resources::{EventType, ResourceStore, WatchEvent, parse_resource_version};

/// A store revision. Every write gets the next one; `resourceVersion` is its decimal form.
pub type Revision = i64;

/// Largest value the store accepts (etcd refuses requests over 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong, by cause; callers match on variants, never on messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{key} not found")]
    NotFound { key: String },
    #[error("{key} already exists")]
    AlreadyExists { key: String },
    #[error("{key} was modified: expected resourceVersion {expected}, current is {current}; get it again and retry")]
    Conflict { key: String, expected: Revision, current: Revision },
    #[error(
        "revision {requested} has been compacted (oldest available history starts after {compacted}); relist and watch from the new revision"
    )]
    Compacted { requested: Revision, compacted: Revision },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Invalid(String),
}

/// One stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change. For `Delete`, `entry` holds the value before deletion and `entry.mod_revision` is
/// the revision of the deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    pub kind: EventKind,
    pub entry: KvEntry,
}

impl KvEvent {
    pub fn revision(&self) -> Revision {
        self.entry.mod_revision
    }
}

/// Events in revision order. An `Err` ends the stream.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<KvEvent>> + Send>>;

/// The storage contract every backend implements; one conformance suite (tests/conformance.rs)
/// runs against all of them.
#[async_trait]
pub trait ConfigStore: Send + Sync + fmt::Debug {
    /// A short name for logs and errors ("embedded", "etcd").
    fn backend(&self) -> &'static str;
    async fn get(&self, key: &str) -> Result<Option<KvEntry>>;
    /// Every entry whose key starts with `prefix`, sorted by key, and the store revision the
    /// list reflects (watch from it to see every later change).
    async fn list(&self, prefix: &str) -> Result<(Vec<KvEntry>, Revision)>;
    /// Creates `key`; fails with `AlreadyExists` if it is there. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision>;
    /// Replaces `key`. With `expected`, only if its `mod_revision` is still that (else
    /// `Conflict`). Fails with `NotFound` if absent. Returns the new revision.
    async fn update(&self, key: &str, value: Vec<u8>, expected: Option<Revision>) -> Result<Revision>;
    /// Deletes `key` (conditionally, like `update`). Returns the deleted entry and the revision
    /// of the deletion.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(KvEntry, Revision)>;
    /// Every change under `prefix` with a revision greater than `after`, in order, then live
    /// changes as they happen. `Compacted` if that history is gone.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream>;
    async fn current_revision(&self) -> Result<Revision>;
    /// Drops history up to and including `revision`; watches from before it get `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<()>;
}

/// Which backend to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// A redb file at this path.
    Embedded { path: std::path::PathBuf },
    /// etcd endpoints (`http://host:port`) and the key prefix to keep everything under.
    Etcd { endpoints: Vec<String>, prefix: String },
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Embedded { path } => write!(f, "embedded store at {}", path.display()),
            StoreConfig::Etcd { endpoints, prefix } => {
                write!(f, "etcd at {} (prefix {prefix})", endpoints.join(","))
            }
        }
    }
}

/// Opens the configured backend.
pub async fn open(config: &StoreConfig) -> Result<std::sync::Arc<dyn ConfigStore>> {
    Ok(match config {
        StoreConfig::Embedded { path } => std::sync::Arc::new(embedded::EmbeddedStore::open(path)?),
        StoreConfig::Etcd { endpoints, prefix } => {
            std::sync::Arc::new(etcd::EtcdStore::connect(endpoints, prefix).await?)
        }
    })
}
