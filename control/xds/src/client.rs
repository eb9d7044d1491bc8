//! A minimal ADS client (Delta), for tests and the scale benchmark: it subscribes like Envoy
//! (wildcard clusters and listeners, then the endpoints and routes they name), ACKs what it
//! receives and keeps the versions it holds. trellis-proxy has its own, complete client.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::hub::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

/// One Delta ADS stream.
#[derive(Debug)]
pub struct DeltaClient {
    node: Node,
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    sent_node: bool,
    /// What this client holds: type → name → version.
    pub held: BTreeMap<String, BTreeMap<String, String>>,
    /// Bytes of every response received (protobuf-encoded size).
    pub bytes_received: u64,
}

impl DeltaClient {
    pub async fn connect(addr: &str, node: Node) -> Result<DeltaClient, String> {
        let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?
            .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(64);
        let stream = grpc.delta_aggregated_resources(ReceiverStream::new(rx)).await;
        // The call only resolves once the server answers headers, which tonic sends at once.
        let rx = stream.map_err(|e| format!("open stream: {e}"))?.into_inner();
        Ok(DeltaClient { node, tx, rx, sent_node: false, held: BTreeMap::new(), bytes_received: 0 })
    }

    async fn send(&mut self, mut req: DeltaDiscoveryRequest) -> Result<(), String> {
        if !self.sent_node {
            req.node = Some(self.node.clone());
            self.sent_node = true;
        }
        self.tx.send(req).await.map_err(|_| "stream closed".to_string())
    }

    /// Subscribes to `names` of a type (empty: wildcard, for clusters and listeners), telling
    /// the server which versions it already holds.
    pub async fn subscribe(
        &mut self,
        type_url: &str,
        names: Vec<String>,
        initial: HashMap<String, String>,
    ) -> Result<(), String> {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names,
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await
    }

    /// The next response, or an error after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<DeltaDiscoveryResponse, String> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Err(_) => Err(format!("no response within {timeout:?}")),
            Ok(Err(e)) => Err(format!("stream error: {e}")),
            Ok(Ok(None)) => Err("stream ended".into()),
            Ok(Ok(Some(r))) => {
                self.bytes_received += r.encoded_len() as u64;
                Ok(r)
            }
        }
    }

    /// Applies a response to what the client holds and ACKs it.
    pub async fn ack(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        let held = self.held.entry(resp.type_url.clone()).or_default();
        for r in &resp.resources {
            held.insert(r.name.clone(), r.version.clone());
        }
        for n in &resp.removed_resources {
            held.remove(n);
        }
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    /// Rejects a response, as a proxy does with config it cannot apply.
    pub async fn nack(&mut self, resp: &DeltaDiscoveryResponse, message: &str) -> Result<(), String> {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus { code: 3, message: message.into(), details: Vec::new() }),
            ..Default::default()
        })
        .await
    }

    /// Names of the endpoints (EDS) clusters and route configurations (RDS) listeners refer to.
    pub fn referenced(resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut out = Vec::new();
        for r in &resp.resources {
            let Some(any) = &r.resource else { continue };
            if resp.type_url == CLUSTER_TYPE
                && let Ok(c) = Cluster::decode(any.value.as_slice())
                && let Some(eds) = c.eds_cluster_config
            {
                out.push(if eds.service_name.is_empty() { c.name } else { eds.service_name });
            }
            if resp.type_url == LISTENER_TYPE
                && let Ok(l) = Listener::decode(any.value.as_slice())
            {
                for fc in l.filter_chains {
                    for f in fc.filters {
                        if let Some(ConfigType::TypedConfig(tc)) = f.config_type
                            && let Ok(hcm) = HttpConnectionManager::decode(tc.value.as_slice())
                            && let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier
                        {
                            out.push(rds.route_config_name);
                        }
                    }
                }
            }
        }
        out
    }

    /// Does what Envoy does at start: clusters, then their endpoints; listeners, then their
    /// routes; ACKing each. Returns once all four types have been received.
    pub async fn sync_like_envoy(&mut self, timeout: Duration) -> Result<(), String> {
        self.subscribe(CLUSTER_TYPE, Vec::new(), HashMap::new()).await?;
        let cds = self.recv(timeout).await?;
        self.ack(&cds).await?;
        self.subscribe(LISTENER_TYPE, Vec::new(), HashMap::new()).await?;
        let eds_names = Self::referenced(&cds);
        self.subscribe(ENDPOINT_TYPE, eds_names, HashMap::new()).await?;
        let mut pending = vec![LISTENER_TYPE, ENDPOINT_TYPE];
        while !pending.is_empty() {
            let r = self.recv(timeout).await?;
            self.ack(&r).await?;
            pending.retain(|t| *t != r.type_url);
            if r.type_url == LISTENER_TYPE {
                let names = Self::referenced(&r);
                self.subscribe(ROUTE_TYPE, names, HashMap::new()).await?;
                pending.push(ROUTE_TYPE);
            }
        }
        Ok(())
    }
}
