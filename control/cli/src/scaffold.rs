//! `trellis filter new NAME`: a filter crate that builds (wasm32-wasip1), tests (the testkit,
//! in the real host) and loads (a WasmPlugin with its file:// path). Two packages in a cargo
//! workspace of their own: `NAME` (the filter, a cdylib) and `NAME-tests` (host-side tests).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Where the Trellis sources are (the SDK and testkit are path dependencies until published).
fn default_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Writes the crate; refuses to touch an existing directory.
pub fn new_filter(name: &str, dir: Option<&Path>, repo: Option<&Path>) -> anyhow::Result<PathBuf> {
    if !valid_name(name) {
        bail!("filter name {name:?}: use lower-case letters, digits and dashes, starting with a letter");
    }
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        bail!("{} already exists; choose another --dir", dir.display());
    }
    let repo = repo.map(Path::to_path_buf).unwrap_or_else(default_repo);
    let repo = repo.canonicalize().with_context(|| format!("Trellis sources at {} (pass --repo)", repo.display()))?;
    let sdk = repo.join("sdk/trellis-sdk");
    let testkit = repo.join("sdk/testkit");
    if !sdk.join("Cargo.toml").exists() || !testkit.join("Cargo.toml").exists() {
        bail!("no Trellis SDK under {} (pass --repo with a Trellis checkout)", repo.display());
    }
    let krate = name.replace('-', "_");
    let files: Vec<(PathBuf, String)> = vec![
        (
            dir.join("Cargo.toml"),
            r#"[workspace]
resolver = "3"
members = ["filter", "tests"]

[profile.wasm]
inherits = "release"
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
            .to_string(),
        ),
        (
            dir.join("filter/Cargo.toml"),
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
trellis-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}
"#,
                sdk = sdk.display()
            ),
        ),
        (
            dir.join("filter/src/lib.rs"),
            format!(
                r#"//! {name}: a Trellis filter. Configuration: {{"header": "x-{name}", "denyPrefix": "/admin"}}.

use serde::Deserialize;
use trellis_sdk::{{Counter, Decision, Filter, LocalReply, Request}};

#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {{
    header: String,
    #[serde(default)]
    deny_prefix: Option<String>,
}}

impl Default for Config {{
    fn default() -> Self {{
        Config {{ header: "x-{name}".into(), deny_prefix: None }}
    }}
}}

struct Plugin {{
    config: Config,
    requests: Counter,
}}

impl Filter for Plugin {{
    type Config = Config;

    fn new(config: &Config) -> Self {{
        Plugin {{ config: config.clone(), requests: Counter::define("{krate}_requests") }}
    }}

    fn on_request(&mut self, req: &mut Request) -> Decision {{
        self.requests.inc(1);
        if let Some(prefix) = &self.config.deny_prefix
            && req.path().starts_with(prefix.as_str())
        {{
            return Decision::Reply(LocalReply::new(403).body("denied by {name}"));
        }}
        req.set_header(&self.config.header, "1");
        Decision::Continue
    }}
}}

trellis_sdk::register!(Plugin);
"#
            ),
        ),
        (
            dir.join("tests/Cargo.toml"),
            format!(
                r#"[package]
name = "{name}-tests"
version = "0.1.0"
edition = "2024"
publish = false

[dev-dependencies]
trellis-filter-testkit = {{ path = "{testkit}" }}
serde_json = "1"
"#,
                testkit = testkit.display()
            ),
        ),
        (dir.join("tests/src/lib.rs"), "//! Host-side tests of the filter: see tests/filter.rs.\n".to_string()),
        (
            dir.join("tests/tests/filter.rs"),
            format!(
                r#"//! The filter in the real Trellis host, against scripted requests (no proxy, no network).

use std::path::Path;

use serde_json::json;
use trellis_filter_testkit::{{Action, Filter, build}};

fn filter() -> Filter {{
    let wasm = build(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"), "{name}").unwrap();
    Filter::from_file(wasm).unwrap()
}}

#[test]
fn stamps_requests_and_denies_the_prefix() {{
    let mut vm = filter().config(json!({{"header": "x-{name}", "denyPrefix": "/admin"}})).start().unwrap();
    let ex = vm.request().path("/").send().unwrap();
    assert_eq!(ex.request_header("x-{name}").as_deref(), Some("1"));
    let ex = vm.request().path("/admin").send().unwrap();
    assert_eq!(ex.action, Action::Pause);
    assert_eq!(ex.local_reply().unwrap().status, 403);
    assert_eq!(vm.metric("{krate}_requests"), Some(2));
}}
"#
            ),
        ),
        (
            dir.join("README.md"),
            format!(
                r#"# {name}

A Trellis (proxy-wasm) filter.

    cargo build -p {name} --target wasm32-wasip1 --profile wasm    # target/wasm32-wasip1/wasm/{krate}.wasm
    cargo test -p {name}-tests                                     # in the real host, no proxy

Load it in the mesh (Envoy and trellis-proxy alike), with the module on the proxies' hosts:

```yaml
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, namespace: default}}
spec:
  url: file://$PWD/target/wasm32-wasip1/wasm/{krate}.wasm
  pluginConfig: {{header: x-{name}, denyPrefix: /admin}}
```
"#
            ),
        ),
        (dir.join(".gitignore"), "/target\n".to_string()),
    ];
    for (path, text) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_existing_directories_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(new_filter("Bad_Name", Some(&tmp.path().join("x")), None).is_err());
        let err = new_filter("ok", Some(tmp.path()), None).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let dir = new_filter("my-filter", Some(&tmp.path().join("my-filter")), None).unwrap();
        let lib = std::fs::read_to_string(dir.join("filter/src/lib.rs")).unwrap();
        assert!(lib.contains("trellis_sdk::register!(Plugin)") && lib.contains("my_filter_requests"));
        assert!(std::fs::read_to_string(dir.join("filter/Cargo.toml")).unwrap().contains("sdk/trellis-sdk"));
    }
}
