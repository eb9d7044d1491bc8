//! Who the proxy is and where its control plane is: a small YAML file and/or flags (flags
//! win). The identity becomes the xDS `Node` with Istio's metadata keys, exactly what an
//! Istio-style Envoy bootstrap sends, so the control plane treats both proxies alike.
//!
//! ```yaml
//! xds: 127.0.0.1:15010
//! xdsCaFile: /etc/trellis/api-ca.pem  # xDS + CA over TLS, checked against this CA (control.rs)
//! admin: 127.0.0.1:15000
//! metrics: 0.0.0.0:15090       # Prometheus: /stats/prometheus
//! accessLog: {format: text}     # off (default), text (Envoy's format) or json; path: FILE
//! node:
//!   namespace: bookinfo
//!   workloadName: reviews-v1
//!   serviceAccount: bookinfo-reviews
//!   labels: {app: reviews, version: v1}
//!   cluster: Kubernetes
//!   network: ""
//!   locality: us-east1/us-east1-b
//!   ips: [127.0.0.2]
//!   type: sidecar            # or router (gateways)
//! listeners:
//!   outbound: 127.0.0.1:15001
//!   inbound: 0.0.0.0:15006
//! wasmCacheDir: /var/cache/trellis-proxy/wasm   # fetched and compiled modules; none by default
//! identity: {tokenFile: /var/run/trellis/token}  # SPIFFE certificate from the mesh CA (identity.rs)
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Bootstrap {
    /// The control plane's xDS address (`HOST:PORT`, or `https://HOST:PORT`).
    pub xds: String,
    /// The CA of the control plane's xDS certificate (PEM): when set, xDS and certificate
    /// requests go over TLS (`crate::control`); empty: plaintext (loopback control planes).
    pub xds_ca_file: String,
    /// The admin port; keep it on loopback.
    pub admin: String,
    /// The Prometheus port.
    pub metrics: String,
    pub access_log: AccessLogConfig,
    pub node: NodeConfig,
    pub listeners: ListenerAddresses,
    /// Where fetched modules and their compiled code are kept across restarts (created
    /// private); `None`: in memory only.
    pub wasm_cache_dir: Option<std::path::PathBuf>,
    /// The workload certificate from the mesh CA (crate::identity).
    pub identity: crate::identity::IdentityConfig,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap {
            xds: "127.0.0.1:15010".into(),
            xds_ca_file: String::new(),
            admin: "127.0.0.1:15000".into(),
            metrics: "0.0.0.0:15090".into(),
            access_log: AccessLogConfig::default(),
            node: NodeConfig::default(),
            listeners: ListenerAddresses::default(),
            wasm_cache_dir: None,
            identity: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Derived from the rest when empty: `TYPE~IP~WORKLOAD.NS~NS.svc.cluster.local`.
    pub id: String,
    pub namespace: String,
    pub workload_name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub cluster: String,
    pub network: String,
    /// `region/zone/subzone`.
    pub locality: String,
    pub ips: Vec<String>,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: String::new(),
            namespace: "default".into(),
            workload_name: String::new(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            cluster: "Kubernetes".into(),
            network: String::new(),
            locality: String::new(),
            ips: Vec::new(),
            kind: "sidecar".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// `off`, `text` or `json`.
    pub format: String,
    /// A file to append to; stdout when empty.
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ListenerAddresses {
    pub outbound: String,
    pub inbound: String,
}

impl Default for ListenerAddresses {
    fn default() -> Self {
        ListenerAddresses { outbound: "127.0.0.1:15001".into(), inbound: "0.0.0.0:15006".into() }
    }
}

impl Bootstrap {
    /// Reads a bootstrap file; unknown fields are errors naming them.
    pub fn load(path: &Path) -> Result<Bootstrap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks addresses and names before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        for (what, addr) in [
            ("xds", &self.xds),
            ("admin", &self.admin),
            ("metrics", &self.metrics),
            ("listeners.outbound", &self.listeners.outbound),
            ("listeners.inbound", &self.listeners.inbound),
        ] {
            let ok = addr.parse::<std::net::SocketAddr>().is_ok()
                || (what == "xds" && addr.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()));
            if !ok {
                return Err(format!("{what}: {addr:?} is not HOST:PORT"));
            }
        }
        crate::control::endpoint(&self.xds, &self.xds_ca_file).map_err(|e| format!("xds: {e}"))?;
        if !matches!(self.node.kind.as_str(), "sidecar" | "router") {
            return Err(format!("node.type: {:?} is neither sidecar nor router", self.node.kind));
        }
        self.access_log.format.parse::<crate::access_log::Format>().map_err(|e| format!("accessLog.format: {e}"))?;
        if self.node.namespace.is_empty() {
            return Err("node.namespace: empty".into());
        }
        Ok(())
    }

    pub fn node_id(&self) -> String {
        let n = &self.node;
        if !n.id.is_empty() {
            return n.id.clone();
        }
        let ip = n.ips.first().map(String::as_str).unwrap_or("127.0.0.1");
        let name = if n.workload_name.is_empty() { "trellis-proxy" } else { n.workload_name.as_str() };
        format!("{}~{ip}~{name}.{ns}~{ns}.svc.cluster.local", n.kind, ns = n.namespace)
    }

    /// This workload, for the metrics' labels.
    pub fn workload(&self) -> crate::metrics::Workload {
        let n = &self.node;
        crate::metrics::Workload {
            name: n.workload_name.clone(),
            namespace: n.namespace.clone(),
            app: n.labels.get("app").cloned().unwrap_or_default(),
            version: n.labels.get("version").cloned().unwrap_or_default(),
            cluster: n.cluster.clone(),
            principal: String::new(),
        }
    }

    /// The access log it asks for.
    pub fn access_log(&self) -> Result<crate::access_log::AccessLog, String> {
        let format = self.access_log.format.parse()?;
        let path = (!self.access_log.path.is_empty()).then(|| std::path::Path::new(&self.access_log.path));
        crate::access_log::AccessLog::new(format, path)
            .map_err(|e| format!("accessLog.path {:?}: {e}", self.access_log.path))
    }

    /// The xDS node, with Istio's metadata keys.
    pub fn node(&self) -> Node {
        let n = &self.node;
        let s = |v: &str| Value { kind: Some(Kind::StringValue(v.to_string())) };
        let mut meta = Struct::default();
        let mut put = |k: &str, v: Value| {
            meta.fields.insert(k.to_string(), v);
        };
        put("NAMESPACE", s(&n.namespace));
        put("SERVICE_ACCOUNT", s(&n.service_account));
        put("CLUSTER_ID", s(&n.cluster));
        if !n.workload_name.is_empty() {
            put("WORKLOAD_NAME", s(&n.workload_name));
        }
        if !n.network.is_empty() {
            put("NETWORK", s(&n.network));
        }
        if !n.ips.is_empty() {
            put("INSTANCE_IPS", s(&n.ips.join(",")));
        }
        let labels = Struct { fields: n.labels.iter().map(|(k, v)| (k.clone(), s(v))).collect() };
        put("LABELS", Value { kind: Some(Kind::StructValue(labels)) });
        put("TRELLIS_OUTBOUND_LISTENER", s(&self.listeners.outbound));
        put("TRELLIS_INBOUND_LISTENER", s(&self.listeners.inbound));
        put("TRELLIS_PROXY_TYPE", s(&n.kind));
        if !self.identity.token_file.is_empty() {
            // It gets a workload certificate, so it can serve mTLS.
            put("TRELLIS_MTLS", s("true"));
        }
        let mut parts = n.locality.splitn(3, '/');
        let locality = Locality {
            region: parts.next().unwrap_or_default().to_string(),
            zone: parts.next().unwrap_or_default().to_string(),
            sub_zone: parts.next().unwrap_or_default().to_string(),
        };
        Node {
            id: self.node_id(),
            cluster: format!(
                "{}.{}",
                if n.workload_name.is_empty() { "trellis-proxy" } else { &n.workload_name },
                n.namespace
            ),
            metadata: Some(meta),
            locality: Some(locality),
            user_agent_name: "trellis-proxy".into(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_file_becomes_an_istio_style_node() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("b.yaml");
        std::fs::write(
            &f,
            "xds: 127.0.0.1:25010\nnode:\n  namespace: bookinfo\n  workloadName: reviews-v1\n  labels: {app: reviews}\n  locality: us-east1/b\n  ips: [127.0.0.2]\n",
        )
        .unwrap();
        let b = Bootstrap::load(&f).unwrap();
        b.validate().unwrap();
        let node = b.node();
        assert_eq!(node.id, "sidecar~127.0.0.2~reviews-v1.bookinfo~bookinfo.svc.cluster.local");
        assert_eq!(node.locality.as_ref().unwrap().zone, "b");
        let meta = node.metadata.unwrap();
        assert_eq!(meta.fields["NAMESPACE"].kind, Some(Kind::StringValue("bookinfo".into())));
        assert_eq!(meta.fields["INSTANCE_IPS"].kind, Some(Kind::StringValue("127.0.0.2".into())));
    }

    #[test]
    fn unknown_fields_and_bad_addresses_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("b.yaml");
        std::fs::write(&f, "xds: 127.0.0.1:25010\nnode: {namespce: x}\n").unwrap();
        let e = Bootstrap::load(&f).unwrap_err();
        assert!(e.contains("namespce"), "{e}");
        let b = Bootstrap { admin: "nowhere".into(), ..Default::default() };
        assert!(b.validate().unwrap_err().contains("admin"));
    }
}
