//! API authentication: bearer tokens.
//!
//! At first start the control plane creates an admin token in `<data-dir>/admin.token` with
//! mode 0600; every API request must present it (`Authorization: Bearer ...`). Anonymous
//! access exists only for loopback development and must be asked for explicitly.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Who may call the API.
#[derive(Debug, Clone)]
pub struct Auth {
    tokens: Vec<String>,
    anonymous: bool,
}

impl Auth {
    pub fn new(tokens: Vec<String>, anonymous: bool) -> Self {
        Self { tokens, anonymous }
    }

    /// Whether a request with this `Authorization` header value may proceed.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        if self.anonymous {
            return true;
        }
        let Some(token) = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return false;
        };
        self.tokens
            .iter()
            .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
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
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let token = token.trim().to_string();
        if token.len() < 32 {
            bail!(
                "{} holds a token shorter than 32 characters; delete it to have a new one generated",
                path.display()
            );
        }
        return Ok(token);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
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
        bail!(
            "{} is readable by others (mode {mode:o}); run chmod 600 on it",
            path.display()
        );
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
        let mode = std::fs::metadata(token_path(dir.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(
            token_path(dir.path()),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(
            load_or_create_token(dir.path())
                .unwrap_err()
                .to_string()
                .contains("chmod 600")
        );
    }

    #[test]
    fn only_the_token_is_accepted() {
        let auth = Auth::new(vec!["secret-token".into()], false);
        assert!(auth.allows(Some("Bearer secret-token")));
        assert!(!auth.allows(Some("Bearer secret-tokem")));
        assert!(!auth.allows(Some("secret-token")));
        assert!(!auth.allows(None));
        assert!(Auth::new(vec![], true).allows(None));
    }
}
