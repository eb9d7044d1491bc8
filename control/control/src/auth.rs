//! API authentication and authorization.
//!
//! At first start the control plane creates an admin token in `<data-dir>/admin.token` with
//! mode 0600 (the bootstrap credential). Further tokens are `ApiToken` resources
//! (`trellis.dev/v1alpha1`, managed with `trellis token create/revoke`): each has a role
//! (`Viewer` reads, `Editor` also writes configuration, `Admin` does everything including
//! tokens and cluster-scoped kinds), may be limited to namespaces, and is revoked by deleting
//! it. Only the SHA-256 of a token's secret is stored. Every request must present a token as
//! `Authorization: Bearer ...`; anonymous access exists only for loopback development and must
//! be asked for explicitly.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use trellis_model::spec::{Spec, TokenRole};
use trellis_model::{Kind, Resource, validate_resource};
use trellis_store::{EventType, ReflectorEvent, ResourceStore, reflector};

/// Who is calling, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The ApiToken's name (`admin` for the bootstrap token).
    pub name: String,
    pub role: TokenRole,
    /// `Some`: only namespaced resources in these namespaces.
    pub namespaces: Option<BTreeSet<String>>,
}

impl Principal {
    pub fn admin(name: &str) -> Self {
        Self { name: name.to_string(), role: TokenRole::Admin, namespaces: None }
    }

    /// May this principal read (or, with `write`, change) `kind` (any when `None`) in
    /// `namespace` (`None`: across all namespaces, or a cluster-scoped kind)? The error says why
    /// not.
    pub fn check(&self, write: bool, kind: Option<Kind>, namespace: Option<&str>) -> Result<(), String> {
        if write && self.role == TokenRole::Viewer {
            return Err(format!("token {:?} is read-only (Viewer)", self.name));
        }
        if kind == Some(Kind::ApiToken) && self.role != TokenRole::Admin {
            return Err(format!("only Admin tokens manage ApiTokens; {:?} is {:?}", self.name, self.role));
        }
        let cluster_scoped = kind.is_some_and(|k| !k.namespaced());
        if write && cluster_scoped && self.role != TokenRole::Admin {
            return Err(format!("only Admin tokens change cluster-scoped kinds; {:?} is {:?}", self.name, self.role));
        }
        if let Some(allowed) = &self.namespaces {
            let list = allowed.iter().cloned().collect::<Vec<_>>().join(", ");
            match namespace {
                _ if cluster_scoped && !write => {}
                Some(ns) if allowed.contains(ns) => {}
                Some(ns) => {
                    return Err(format!("token {:?} is limited to namespaces {list}, not {ns:?}", self.name));
                }
                None => {
                    return Err(format!(
                        "token {:?} is limited to namespaces {list}: ask within one of them",
                        self.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The credentials the API accepts: the bootstrap admin token(s) and the ApiTokens in the
/// store (kept current by [`Auth::watch_tokens`]).
#[derive(Debug)]
pub struct Auth {
    admin_tokens: Vec<String>,
    /// SHA-256 (hex) of a secret → who it is.
    tokens: RwLock<HashMap<String, Principal>>,
    anonymous: bool,
}

/// Lower-case hex SHA-256 of a token secret, as ApiTokens store it.
pub fn token_sha256(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Auth {
    pub fn new(admin_tokens: Vec<String>, anonymous: bool) -> Self {
        Self { admin_tokens, tokens: RwLock::new(HashMap::new()), anonymous }
    }

    /// Who presents this `Authorization` header value, if anyone valid.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<Principal> {
        let token = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return self.anonymous.then(|| Principal::admin("anonymous"));
        };
        if self.admin_tokens.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) {
            return Some(Principal::admin("admin"));
        }
        // Looking up by hash compares hashes, not secrets: no timing leak about the secret.
        let found = self.tokens.read().unwrap_or_else(|p| p.into_inner()).get(&token_sha256(token)).cloned();
        found.or_else(|| self.anonymous.then(|| Principal::admin("anonymous")))
    }

    fn principal_of(r: &Resource) -> Option<(String, Principal)> {
        match validate_resource(r, "") {
            Ok((key, Spec::ApiToken(t))) => {
                let namespaces = (!t.namespaces.is_empty()).then(|| t.namespaces.iter().cloned().collect());
                Some((t.sha256, Principal { name: key.name, role: t.role?, namespaces }))
            }
            _ => None,
        }
    }

    /// Replaces the known ApiTokens.
    pub fn set_tokens(&self, items: &[Resource]) {
        let map = items.iter().filter_map(Self::principal_of).collect();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    fn apply_event(&self, event_type: EventType, r: &Resource) {
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|_, p| p.name != r.metadata.name);
        if event_type != EventType::Deleted
            && let Some((hash, principal)) = Self::principal_of(r)
        {
            tokens.insert(hash, principal);
        }
    }

    /// Keeps the ApiToken index current from the store, for as long as the task runs.
    pub fn watch_tokens(self: &Arc<Self>, store: ResourceStore) -> tokio::task::JoinHandle<()> {
        let auth = self.clone();
        tokio::spawn(async move {
            let mut events = Box::pin(reflector(store, Some(Kind::ApiToken), None));
            while let Some(ev) = events.next().await {
                match ev {
                    ReflectorEvent::Synced { items, .. } => auth.set_tokens(&items),
                    ReflectorEvent::Changed(ev) => auth.apply_event(ev.event_type, &ev.object),
                    ReflectorEvent::Retrying { error } => {
                        tracing::warn!(%error, "cannot read ApiTokens; keeping the last known set")
                    }
                }
            }
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The admin token file in a data directory.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Reads the admin token, creating it (32 random bytes, hex, mode 0600) on first start.
pub fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = token_path(data_dir);
    if path.exists() {
        check_private(&path)?;
        let token = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let token = token.trim().to_string();
        if token.len() < 32 {
            bail!("{} holds a token shorter than 32 characters; delete it to have a new one generated", path.display());
        }
        return Ok(token);
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = open_private(&path)?;
    file.write_all(token.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

#[cfg(unix)]
fn open_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

#[cfg(unix)]
fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!("{} is readable by others (mode {mode:o}); run chmod 600 on it", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = load_or_create_token(dir.path()).unwrap();
        let t2 = load_or_create_token(dir.path()).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(token_path(dir.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(token_path(dir.path()), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_token(dir.path()).unwrap_err().to_string().contains("chmod 600"));
    }

    #[test]
    fn only_known_tokens_are_accepted() {
        let auth = Auth::new(vec!["secret-token".into()], false);
        assert_eq!(auth.authenticate(Some("Bearer secret-token")), Some(Principal::admin("admin")));
        assert!(auth.authenticate(Some("Bearer secret-tokem")).is_none());
        assert!(auth.authenticate(Some("secret-token")).is_none());
        assert!(auth.authenticate(None).is_none());
        assert!(Auth::new(vec![], true).authenticate(None).is_some());
        let viewer: Resource = serde_json::from_value(serde_json::json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "ApiToken",
            "metadata": {"name": "ci"}, "spec": {"role": "Viewer", "namespaces": ["bookinfo"], "sha256": token_sha256("viewer-secret")}})).unwrap();
        auth.set_tokens(&[viewer]);
        let p = auth.authenticate(Some("Bearer viewer-secret")).unwrap();
        assert_eq!((p.name.as_str(), p.role), ("ci", TokenRole::Viewer));
    }

    #[test]
    fn roles_and_namespaces_limit_what_a_token_reaches() {
        let admin = Principal::admin("a");
        assert!(admin.check(true, Some(Kind::ApiToken), None).is_ok());
        let viewer = Principal { name: "v".into(), role: TokenRole::Viewer, namespaces: None };
        assert!(viewer.check(false, Some(Kind::VirtualService), None).is_ok());
        assert!(viewer.check(true, Some(Kind::VirtualService), Some("x")).unwrap_err().contains("read-only"));
        assert!(viewer.check(false, Some(Kind::ApiToken), None).unwrap_err().contains("Admin"));
        let editor =
            Principal { name: "e".into(), role: TokenRole::Editor, namespaces: Some(["bookinfo".to_string()].into()) };
        assert!(editor.check(true, Some(Kind::VirtualService), Some("bookinfo")).is_ok());
        assert!(
            editor
                .check(true, Some(Kind::VirtualService), Some("other"))
                .unwrap_err()
                .contains("limited to namespaces bookinfo")
        );
        assert!(editor.check(false, Some(Kind::VirtualService), None).is_err(), "no cluster-wide lists");
        assert!(editor.check(false, Some(Kind::MeshCluster), None).is_ok(), "cluster-scoped reads are fine");
        assert!(editor.check(true, Some(Kind::MeshCluster), None).is_err());
    }
}
