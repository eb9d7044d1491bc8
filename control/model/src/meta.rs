//! The Kubernetes-style envelope every resource comes in: `apiVersion`, `kind`, `metadata`,
//! `spec` and `status`. Metadata fields Trellis does not interpret (`managedFields`,
//! `ownerReferences`, `finalizers`, ...) are accepted and kept verbatim; `status` is kept too.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::kind::Kind;

/// One configuration object as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

/// Standard object metadata. Unknown keys are kept in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Everything else Kubernetes or Istio put in metadata, kept as it came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Identity of a stored object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = if kind.namespaced() { namespace.into() } else { String::new() };
        Self { kind, namespace, name: name.into() }
    }

    /// The storage key, `{group}/{plural}/{namespace}/{name}`; cluster-scoped kinds have an
    /// empty namespace segment. Prefixes of it select a kind or a kind in one namespace.
    pub fn storage_key(&self) -> String {
        format!("{}{}", Self::namespace_prefix(self.kind, Some(&self.namespace)), self.name)
    }

    /// `{group}/{plural}/` — every object of a kind.
    pub fn kind_prefix(kind: Kind) -> String {
        format!("{}/{}/", kind.group(), kind.plural())
    }

    /// `{group}/{plural}/{namespace}/` — every object of a kind in one namespace (or every
    /// object of the kind when `namespace` is `None`).
    pub fn namespace_prefix(kind: Kind, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if kind.namespaced() => format!("{}{ns}/", Self::kind_prefix(kind)),
            Some(_) => format!("{}/", Self::kind_prefix(kind)),
            None => Self::kind_prefix(kind),
        }
    }

    /// Inverse of [`ResourceKey::storage_key`].
    pub fn from_storage_key(key: &str) -> Option<ResourceKey> {
        let mut parts = key.splitn(4, '/');
        let group = parts.next()?;
        let plural = parts.next()?;
        let namespace = parts.next()?;
        let name = parts.next()?;
        let kind = Kind::from_group_plural(group, plural)?;
        if name.is_empty() || name.contains('/') {
            return None;
        }
        Some(ResourceKey::new(kind, namespace, name))
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Resource {
    /// Resolves `apiVersion` + `kind`.
    pub fn kind(&self) -> Result<Kind, String> {
        Kind::from_type(&self.api_version, &self.kind)
    }

    /// The key, with `default_namespace` used when a namespaced object names none.
    pub fn key(&self, default_namespace: &str) -> Result<ResourceKey, String> {
        let kind = self.kind()?;
        let ns = self.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(default_namespace);
        Ok(ResourceKey::new(kind, ns, self.metadata.name.clone()))
    }

    /// The namespace, or "" for cluster-scoped kinds and objects that name none.
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("")
    }

    /// Whether `other` carries the same user intent (labels, annotations, spec), ignoring
    /// server-managed metadata and status — what `apply` uses to report `unchanged`.
    pub fn same_intent(&self, other: &Resource) -> bool {
        self.api_version == other.api_version
            && self.kind == other.kind
            && self.metadata.labels == other.metadata.labels
            && self.metadata.annotations == other.metadata.annotations
            && normalized_spec(&self.spec) == normalized_spec(&other.spec)
    }
}

fn normalized_spec(v: &Value) -> Value {
    match v {
        Value::Null => Value::Object(Map::new()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_keys_round_trip() {
        let k = ResourceKey::new(Kind::VirtualService, "bookinfo", "reviews");
        assert_eq!(k.storage_key(), "networking.istio.io/virtualservices/bookinfo/reviews");
        assert_eq!(ResourceKey::from_storage_key(&k.storage_key()), Some(k));
        let c = ResourceKey::new(Kind::MeshCluster, "ignored", "east");
        assert_eq!(c.storage_key(), "trellis.dev/meshclusters//east");
        assert_eq!(ResourceKey::from_storage_key(&c.storage_key()), Some(c));
    }

    #[test]
    fn unknown_metadata_is_kept() {
        let json = r#"{"apiVersion":"networking.istio.io/v1","kind":"Gateway",
            "metadata":{"name":"g","managedFields":[{"manager":"kubectl"}],"finalizers":["x"]},
            "spec":{},"status":{"conditions":[]}}"#;
        let r: Resource = serde_json::from_str(json).unwrap();
        assert!(r.metadata.extra.contains_key("managedFields"));
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["metadata"]["finalizers"][0], "x");
        assert_eq!(back["status"]["conditions"], serde_json::json!([]));
    }
}
