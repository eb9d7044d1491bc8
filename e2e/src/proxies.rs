//! The proxy a shared scenario runs against: a real Envoy over SotW or Delta ADS, or
//! trellis-proxy. Both get the same bootstrap facts (node identity, namespace, labels,
//! locality, listener addresses) and everything else from the control plane.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::envoy::{AdsApi, Envoy};
use crate::{await_listening, binary, free_port};

/// Which proxy is under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Under {
    Envoy(AdsApi),
    Trellis,
}

/// Who a proxy under test is.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub namespace: String,
    pub locality: String,
    /// A gateway (`router`) rather than a sidecar.
    pub router: bool,
    pub labels: Vec<(String, String)>,
    /// The address to wait for (default: the outbound listener).
    pub wait_for: Option<String>,
}

impl NodeSpec {
    /// A sidecar labelled `app: NAME`.
    pub fn sidecar(name: &str, namespace: &str, locality: &str) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            namespace: namespace.into(),
            locality: locality.into(),
            router: false,
            labels: vec![("app".into(), name.into())],
            wait_for: None,
        }
    }

    /// A gateway with `labels`, ready once `port` on 127.0.0.1 accepts connections.
    pub fn gateway(name: &str, namespace: &str, labels: &[(&str, &str)], port: u16) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            namespace: namespace.into(),
            locality: String::new(),
            router: true,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            wait_for: Some(format!("127.0.0.1:{port}")),
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.router { "router" } else { "sidecar" }
    }

    /// `{k: "v", ...}`
    pub fn labels_yaml(&self) -> String {
        let items: Vec<String> = self.labels.iter().map(|(k, v)| format!("\"{k}\": \"{v}\"")).collect();
        format!("{{{}}}", items.join(", "))
    }
}

/// A running sidecar under test.
#[derive(Debug)]
pub enum Sidecar {
    Envoy(Envoy),
    Trellis(TrellisProxy),
}

impl Sidecar {
    /// Starts a sidecar named `name` in `namespace` (labels `app: NAME`) in `locality`, and
    /// waits until its outbound listener accepts connections.
    pub fn start(under: Under, xds: &str, name: &str, namespace: &str, locality: &str) -> anyhow::Result<Sidecar> {
        Sidecar::start_node(under, xds, &NodeSpec::sidecar(name, namespace, locality))
    }

    pub fn start_node(under: Under, xds: &str, spec: &NodeSpec) -> anyhow::Result<Sidecar> {
        Ok(match under {
            Under::Envoy(api) => Sidecar::Envoy(Envoy::start_node(xds, api, spec)?),
            Under::Trellis => Sidecar::Trellis(TrellisProxy::start_node(xds, spec, &[])?),
        })
    }

    pub fn outbound(&self) -> &str {
        match self {
            Sidecar::Envoy(e) => &e.outbound,
            Sidecar::Trellis(t) => &t.outbound,
        }
    }

    pub fn admin(&self) -> &str {
        match self {
            Sidecar::Envoy(e) => &e.admin,
            Sidecar::Trellis(t) => &t.admin,
        }
    }

    pub fn node_id(&self) -> &str {
        match self {
            Sidecar::Envoy(e) => &e.node_id,
            Sidecar::Trellis(t) => &t.node_id,
        }
    }

    pub fn log_text(&self) -> String {
        match self {
            Sidecar::Envoy(e) => e.log_text(),
            Sidecar::Trellis(t) => t.log_text(),
        }
    }

    pub fn pid(&self) -> u32 {
        match self {
            Sidecar::Envoy(e) => e.pid(),
            Sidecar::Trellis(t) => t.child.id(),
        }
    }
}

/// A running trellis-proxy (from the workspace's target directory).
#[derive(Debug)]
pub struct TrellisProxy {
    child: Child,
    pub outbound: String,
    pub admin: String,
    /// Prometheus address.
    pub metrics: String,
    pub node_id: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TrellisProxy {
    pub fn start(xds: &str, name: &str, namespace: &str, locality: &str) -> anyhow::Result<TrellisProxy> {
        Self::start_with(xds, name, namespace, locality, &[])
    }

    /// As [`TrellisProxy::start`], with extra command-line flags.
    pub fn start_with(
        xds: &str,
        name: &str,
        namespace: &str,
        locality: &str,
        extra: &[&str],
    ) -> anyhow::Result<TrellisProxy> {
        TrellisProxy::start_node(xds, &NodeSpec::sidecar(name, namespace, locality), extra)
    }

    /// Starts trellis-proxy as the node `spec` describes, with extra flags.
    pub fn start_node(xds: &str, spec: &NodeSpec, extra: &[&str]) -> anyhow::Result<TrellisProxy> {
        let (name, namespace, locality) = (spec.name.as_str(), spec.namespace.as_str(), spec.locality.as_str());
        let (kind, labels) = (spec.kind(), spec.labels_yaml());
        let dir = tempfile::tempdir()?;
        let outbound = format!("127.0.0.1:{}", free_port());
        let inbound = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let node_id = format!("{kind}~127.0.0.1~{name}.{namespace}~{namespace}.svc.cluster.local");
        let bootstrap = format!(
            "xds: {xds}\nadmin: {admin}\nmetrics: {metrics}\nnode:\n  id: \"{node_id}\"\n  namespace: {namespace}\n  workloadName: {name}\n  type: {kind}\n  labels: {labels}\n  locality: \"{locality}\"\nlisteners:\n  outbound: {outbound}\n  inbound: {inbound}\n"
        );
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap)?;
        let log = dir.path().join("trellis-proxy.log");
        let concurrency: &[&str] = if extra.contains(&"--concurrency") { &[] } else { &["--concurrency", "2"] };
        let child = Command::new(binary("trellis-proxy")?)
            .args(concurrency)
            .args(["--log", &std::env::var("TRELLIS_E2E_LOG").unwrap_or_else(|_| "info".into()), "-c"])
            .arg(&config)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting trellis-proxy")?;
        let mut p = TrellisProxy { child, outbound, admin, metrics, node_id, log, _dir: dir };
        let target = spec.wait_for.clone().unwrap_or_else(|| p.outbound.clone());
        await_listening(&mut p.child, &target, "trellis-proxy's first listener").with_context(|| p.log_text())?;
        Ok(p)
    }

    /// `GET /certs` on the admin port (the workload certificate it holds), as JSON.
    pub async fn certs(&self) -> anyhow::Result<serde_json::Value> {
        let a = crate::http::ProxyClient::new(&self.admin).get(&self.admin, "/certs", &[]).await?;
        Ok(serde_json::from_str(&a.body)?)
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (graceful drain) and waits for the exit status.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for TrellisProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `trellis-agent`: a workload certificate for an Envoy, over SDS on a unix socket.
#[derive(Debug)]
pub struct TrellisAgent {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TrellisAgent {
    /// Starts the agent for `namespace` / `service_account` with the token in `token_file`, and
    /// waits until it serves its socket.
    pub fn start(ca: &str, token_file: &str, namespace: &str, service_account: &str) -> anyhow::Result<TrellisAgent> {
        TrellisAgent::start_with(ca, token_file, namespace, service_account, &[])
    }

    /// As [`TrellisAgent::start`], with extra flags (e.g. `--xds-ca-file`).
    pub fn start_with(
        ca: &str,
        token_file: &str,
        namespace: &str,
        service_account: &str,
        extra: &[&str],
    ) -> anyhow::Result<TrellisAgent> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("sds.sock");
        let log = dir.path().join("trellis-agent.log");
        let child = Command::new(binary("trellis-agent")?)
            .args(["--ca", ca, "--token-file", token_file, "--namespace", namespace])
            .args(["--service-account", service_account, "--sds-socket"])
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting trellis-agent")?;
        let mut a = TrellisAgent { child, socket, log, _dir: dir };
        let socket = a.socket.clone();
        crate::await_condition("trellis-agent's SDS socket", std::time::Duration::from_secs(20), || socket.exists())
            .with_context(|| std::fs::read_to_string(&a.log).unwrap_or_default())?;
        if let Ok(Some(status)) = a.child.try_wait() {
            anyhow::bail!("trellis-agent exited with {status}");
        }
        Ok(a)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TrellisAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
