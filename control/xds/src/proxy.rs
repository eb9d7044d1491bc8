//! Who a connected proxy is, from its xDS `Node`: Istio's node-metadata keys (`NAMESPACE`,
//! `SERVICE_ACCOUNT`, `LABELS`, `WORKLOAD_NAME`, `CLUSTER_ID`, `NETWORK`, `INSTANCE_IPS`) and
//! `node.locality`, so Istio-style Envoy bootstraps work unchanged. Trellis adds two optional
//! keys for proxies that run without traffic capture, several per host:
//! `TRELLIS_OUTBOUND_LISTENER` and `TRELLIS_INBOUND_LISTENER` (`IP:PORT`), and one for
//! proxies that hold a workload certificate and so can serve mTLS: `TRELLIS_MTLS: "true"`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind as ValueKind};
use trellis_model::registry::{Locality, WorkloadInstance};

/// Whether the proxy is a workload's sidecar or a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Sidecar,
    Router,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    /// The node id, e.g. `sidecar~127.0.0.2~reviews-v1.bookinfo~bookinfo.svc.cluster.local`.
    pub id: String,
    pub kind: ProxyKind,
    pub namespace: String,
    pub service_account: String,
    pub workload_name: String,
    pub labels: BTreeMap<String, String>,
    pub cluster_id: String,
    pub network: String,
    pub locality: Locality,
    pub ips: Vec<String>,
    /// Where the outbound (explicit proxy) listener binds.
    pub outbound_listener: (String, u32),
    /// Where the inbound listener binds.
    pub inbound_listener: (String, u32),
    /// The proxy holds a workload certificate (node metadata `TRELLIS_MTLS`: trellis-proxy with
    /// an identity, or an Envoy with an SDS agent next to it), so it can serve mTLS.
    pub mtls: bool,
}

impl Default for ProxyInfo {
    fn default() -> Self {
        Self {
            id: String::new(),
            kind: ProxyKind::Sidecar,
            namespace: "default".into(),
            service_account: "default".into(),
            workload_name: String::new(),
            labels: BTreeMap::new(),
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            locality: Locality::default(),
            ips: Vec::new(),
            outbound_listener: ("127.0.0.1".into(), 15001),
            inbound_listener: ("0.0.0.0".into(), 15006),
            mtls: false,
        }
    }
}

fn string(v: &Value) -> Option<String> {
    match &v.kind {
        Some(ValueKind::StringValue(s)) => Some(s.clone()),
        Some(ValueKind::NumberValue(n)) => Some(n.to_string()),
        Some(ValueKind::BoolValue(b)) => Some(b.to_string()),
        _ => None,
    }
}

fn field(meta: &Struct, key: &str) -> Option<String> {
    meta.fields.get(key).and_then(string).filter(|s| !s.is_empty())
}

fn listener(s: &str) -> Option<(String, u32)> {
    let (ip, port) = s.rsplit_once(':')?;
    Some((
        ip.trim_matches(|c| c == '[' || c == ']').to_string(),
        port.parse().ok().filter(|p| (1..=65535).contains(p))?,
    ))
}

impl ProxyInfo {
    /// Reads a proxy's identity from its node. Missing fields get Istio's defaults; the node
    /// id's `TYPE~IP~NAME.NAMESPACE~DOMAIN` form is used when metadata is absent.
    pub fn from_node(node: &Node) -> Result<ProxyInfo, String> {
        if node.id.is_empty() {
            return Err("node.id is empty: every proxy needs an id".into());
        }
        let mut p = ProxyInfo { id: node.id.clone(), ..Default::default() };
        let parts: Vec<&str> = node.id.split('~').collect();
        if parts.len() == 4 {
            p.kind = if parts[0] == "router" { ProxyKind::Router } else { ProxyKind::Sidecar };
            if !parts[1].is_empty() {
                p.ips.push(parts[1].to_string());
            }
            if let Some((name, ns)) = parts[2].rsplit_once('.') {
                p.workload_name = name.to_string();
                p.namespace = ns.to_string();
            }
        }
        let empty = Struct::default();
        let meta = node.metadata.as_ref().unwrap_or(&empty);
        if let Some(ns) = field(meta, "NAMESPACE") {
            p.namespace = ns;
        }
        if let Some(sa) = field(meta, "SERVICE_ACCOUNT") {
            p.service_account = sa;
        }
        if let Some(w) = field(meta, "WORKLOAD_NAME") {
            p.workload_name = w;
        }
        if let Some(c) = field(meta, "CLUSTER_ID") {
            p.cluster_id = c;
        }
        if let Some(n) = field(meta, "NETWORK") {
            p.network = n;
        }
        if let Some(ips) = field(meta, "INSTANCE_IPS") {
            p.ips = ips.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if let Some(Value { kind: Some(ValueKind::StructValue(labels)) }) = meta.fields.get("LABELS") {
            p.labels = labels.fields.iter().filter_map(|(k, v)| Some((k.clone(), string(v)?))).collect();
        }
        p.mtls = field(meta, "TRELLIS_MTLS").is_some_and(|v| v == "true");
        if let Some(kind) = field(meta, "TRELLIS_PROXY_TYPE") {
            p.kind = if kind == "router" { ProxyKind::Router } else { ProxyKind::Sidecar };
        }
        for (key, slot) in [
            ("TRELLIS_OUTBOUND_LISTENER", &mut p.outbound_listener),
            ("TRELLIS_INBOUND_LISTENER", &mut p.inbound_listener),
        ] {
            if let Some(v) = field(meta, key) {
                *slot = listener(&v).ok_or_else(|| format!("node metadata {key}={v:?} is not IP:PORT"))?;
            }
        }
        if let Some(l) = &node.locality {
            p.locality = Locality { region: l.region.clone(), zone: l.zone.clone(), subzone: l.sub_zone.clone() };
        }
        Ok(p)
    }

    /// The workload this proxy fronts, for the registry (only when it says where it is).
    pub fn workload(&self) -> Option<WorkloadInstance> {
        let address = self.ips.first()?.clone();
        Some(WorkloadInstance {
            name: if self.workload_name.is_empty() { self.id.clone() } else { self.workload_name.clone() },
            namespace: self.namespace.clone(),
            address,
            ports: BTreeMap::new(),
            labels: self.labels.clone(),
            service_account: self.service_account.clone(),
            locality: self.locality.clone(),
            network: self.network.clone(),
            cluster: self.cluster_id.clone(),
            weight: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value { kind: Some(ValueKind::StringValue(v.into())) }
    }

    #[test]
    fn reads_istio_node_metadata() {
        let mut labels = Struct::default();
        labels.fields.insert("app".into(), s("reviews"));
        let mut meta = Struct::default();
        meta.fields.insert("NAMESPACE".into(), s("bookinfo"));
        meta.fields.insert("SERVICE_ACCOUNT".into(), s("bookinfo-reviews"));
        meta.fields.insert("LABELS".into(), Value { kind: Some(ValueKind::StructValue(labels)) });
        meta.fields.insert("CLUSTER_ID".into(), s("east"));
        meta.fields.insert("TRELLIS_OUTBOUND_LISTENER".into(), s("127.0.0.1:25001"));
        let node = Node {
            id: "sidecar~127.0.0.2~reviews-v1.bookinfo~bookinfo.svc.cluster.local".into(),
            metadata: Some(meta),
            ..Default::default()
        };
        let p = ProxyInfo::from_node(&node).unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.service_account.as_str(), p.cluster_id.as_str()),
            ("bookinfo", "bookinfo-reviews", "east")
        );
        assert_eq!(p.workload_name, "reviews-v1");
        assert_eq!(p.ips, vec!["127.0.0.2"]);
        assert_eq!(p.labels["app"], "reviews");
        assert_eq!(p.outbound_listener, ("127.0.0.1".to_string(), 25001));
        assert_eq!(p.inbound_listener, ("0.0.0.0".to_string(), 15006));
        assert!(ProxyInfo::from_node(&Node::default()).is_err());
    }
}
