//! The mesh CA as the control plane runs it: a plugged-in CA from `--cacerts-dir` (Istio's
//! `cacerts` layout; several clusters plugged with intermediates of one root trust each other),
//! else a self-signed root created by the first control plane that starts and kept in the
//! store (`private/ca/root`, never listed, watched or served by the config API), so every
//! replica on a shared etcd signs with the same root and a restart keeps it. The key is never
//! logged.

use std::path::Path;

use anyhow::{Context, bail};
use trellis_ca::{Ca, CaMaterial};
use trellis_store::ResourceStore;

/// Where the CA's material is kept in the store.
const ROOT_KEY: &str = "ca/root";

/// The stored root: its trust domain and material.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    trust_domain: String,
    material: CaMaterial,
}

/// Where the CA's signing certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Files in Istio's `cacerts` layout.
    Plugged,
    /// The self-signed root in the store, made now.
    Created,
    /// The self-signed root in the store, made earlier (or by another replica).
    Stored,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Plugged => "plugged-in CA files",
            Source::Created => "self-signed root, created now and kept in the store",
            Source::Stored => "self-signed root kept in the store",
        })
    }
}

/// Loads (or on first start creates) the mesh CA for `trust_domain`.
pub async fn load(store: &ResourceStore, trust_domain: &str, cacerts: Option<&Path>) -> anyhow::Result<(Ca, Source)> {
    if let Some(dir) = cacerts {
        let material = CaMaterial::from_dir(dir).with_context(|| format!("--cacerts-dir {}", dir.display()))?;
        let ca = Ca::new(trust_domain, &material).with_context(|| format!("--cacerts-dir {}", dir.display()))?;
        return Ok((ca, Source::Plugged));
    }
    let fresh =
        Stored { trust_domain: trust_domain.to_ascii_lowercase(), material: CaMaterial::self_signed(trust_domain)? };
    let mine = serde_json::to_vec(&fresh)?;
    let kept = store.create_private(ROOT_KEY, mine.clone()).await.context("keeping the CA root in the store")?;
    let source = if kept == mine { Source::Created } else { Source::Stored };
    let stored: Stored = serde_json::from_slice(&kept).context("the CA root in the store is not readable")?;
    if stored.trust_domain != trust_domain.to_ascii_lowercase() {
        bail!(
            "the CA root in the store is for trust domain {:?}, not {trust_domain:?}: start with --trust-domain {} (a mesh has one trust domain)",
            stored.trust_domain,
            stored.trust_domain
        );
    }
    let ca = Ca::new(trust_domain, &stored.material).context("the CA root in the store")?;
    Ok((ca, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(dir: &Path) -> ResourceStore {
        let kv =
            trellis_store::open(&trellis_store::StoreConfig::Embedded { path: dir.join("store.redb") }).await.unwrap();
        ResourceStore::new(kv)
    }

    #[tokio::test]
    async fn the_root_is_created_once_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (first, source) = load(&store(dir.path()).await, "cluster.local", None).await.unwrap();
        assert_eq!(source, Source::Created);
        // A restart (a new store handle on the same file) signs with the same root.
        let (again, source) = load(&store(dir.path()).await, "cluster.local", None).await.unwrap();
        assert_eq!(source, Source::Stored);
        assert_eq!(first.roots_pem(), again.roots_pem());
        // It is not configuration: the config API never lists it.
        let (all, _) = store(dir.path()).await.list(None, None).await.unwrap();
        assert!(all.is_empty(), "{all:?}");
        // Another trust domain is refused with the one to use.
        let e = load(&store(dir.path()).await, "other.domain", None).await.unwrap_err().to_string();
        assert!(e.contains("--trust-domain cluster.local"), "{e}");
    }

    #[tokio::test]
    async fn plugged_in_files_take_precedence_and_their_errors_name_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let m = CaMaterial::self_signed("cluster.local").unwrap();
        for (name, body) in [
            ("ca-cert.pem", &m.ca_cert),
            ("ca-key.pem", &m.ca_key),
            ("root-cert.pem", &m.root_cert),
            ("cert-chain.pem", &m.cert_chain),
        ] {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let s = store(dir.path()).await;
        let (ca, source) = load(&s, "cluster.local", Some(dir.path())).await.unwrap();
        assert_eq!((source, ca.roots_pem().trim()), (Source::Plugged, m.root_cert.trim()));
        std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
        let e = format!("{:#}", load(&s, "cluster.local", Some(dir.path())).await.unwrap_err());
        assert!(e.contains("--cacerts-dir") && e.contains("ca-key.pem"), "{e}");
    }
}
