//! The kinds Trellis accepts: their API groups, served versions, plural names and scope.

use std::fmt;

/// A configuration kind Trellis understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    WorkloadEntry,
    Sidecar,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    Telemetry,
    WasmPlugin,
    MeshCluster,
    ApiToken,
    WorkloadToken,
}

pub const NETWORKING_GROUP: &str = "networking.istio.io";
pub const SECURITY_GROUP: &str = "security.istio.io";
pub const TELEMETRY_GROUP: &str = "telemetry.istio.io";
pub const EXTENSIONS_GROUP: &str = "extensions.istio.io";
pub const TRELLIS_GROUP: &str = "trellis.dev";

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Sidecar,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::Telemetry,
        Kind::WasmPlugin,
        Kind::MeshCluster,
        Kind::ApiToken,
        Kind::WorkloadToken,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Sidecar => "Sidecar",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Telemetry => "Telemetry",
            Kind::WasmPlugin => "WasmPlugin",
            Kind::MeshCluster => "MeshCluster",
            Kind::ApiToken => "ApiToken",
            Kind::WorkloadToken => "WorkloadToken",
        }
    }

    pub fn group(self) -> &'static str {
        match self {
            Kind::VirtualService
            | Kind::DestinationRule
            | Kind::Gateway
            | Kind::ServiceEntry
            | Kind::WorkloadEntry
            | Kind::Sidecar => NETWORKING_GROUP,
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => SECURITY_GROUP,
            Kind::Telemetry => TELEMETRY_GROUP,
            Kind::WasmPlugin => EXTENSIONS_GROUP,
            Kind::MeshCluster | Kind::ApiToken | Kind::WorkloadToken => TRELLIS_GROUP,
        }
    }

    /// Versions served for this kind, the storage (preferred) version first.
    pub fn versions(self) -> &'static [&'static str] {
        match self.group() {
            NETWORKING_GROUP => &["v1", "v1beta1", "v1alpha3"],
            SECURITY_GROUP => &["v1", "v1beta1"],
            TELEMETRY_GROUP => &["v1", "v1alpha1"],
            EXTENSIONS_GROUP => &["v1alpha1"],
            _ => &["v1alpha1"],
        }
    }

    pub fn preferred_version(self) -> &'static str {
        self.versions()[0]
    }

    /// The preferred `apiVersion` string, e.g. `networking.istio.io/v1`.
    pub fn api_version(self) -> String {
        format!("{}/{}", self.group(), self.preferred_version())
    }

    /// Lower-case plural used in API paths, e.g. `virtualservices`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::VirtualService => "virtualservices",
            Kind::DestinationRule => "destinationrules",
            Kind::Gateway => "gateways",
            Kind::ServiceEntry => "serviceentries",
            Kind::WorkloadEntry => "workloadentries",
            Kind::Sidecar => "sidecars",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::RequestAuthentication => "requestauthentications",
            Kind::Telemetry => "telemetries",
            Kind::WasmPlugin => "wasmplugins",
            Kind::MeshCluster => "meshclusters",
            Kind::ApiToken => "apitokens",
            Kind::WorkloadToken => "workloadtokens",
        }
    }

    /// Short names accepted by the CLI, like kubectl's (`vs`, `dr`, ...).
    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::VirtualService => &["vs"],
            Kind::DestinationRule => &["dr"],
            Kind::Gateway => &["gw"],
            Kind::ServiceEntry => &["se"],
            Kind::WorkloadEntry => &["we"],
            Kind::Sidecar => &[],
            Kind::PeerAuthentication => &["pa"],
            Kind::AuthorizationPolicy => &["ap"],
            Kind::RequestAuthentication => &["ra"],
            Kind::Telemetry => &["telemetry"],
            Kind::WasmPlugin => &["wp"],
            Kind::MeshCluster => &["mc"],
            Kind::ApiToken => &["token", "tokens"],
            Kind::WorkloadToken => &["wt"],
        }
    }

    /// Namespaced kinds live under `/namespaces/{ns}/`; cluster-scoped ones do not.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::MeshCluster | Kind::ApiToken)
    }

    /// Finds the kind for an `apiVersion` + `kind` pair, or explains why there is none.
    pub fn from_type(api_version: &str, kind: &str) -> Result<Kind, String> {
        let found = Kind::ALL.into_iter().find(|k| k.name() == kind).ok_or_else(|| {
            format!("unknown kind {kind:?}; Trellis accepts {}", Kind::ALL.map(|k| k.name()).join(", "))
        })?;
        let (group, version) = api_version.split_once('/').ok_or_else(|| {
            format!("apiVersion {api_version:?} must be GROUP/VERSION, e.g. {:?}", found.api_version())
        })?;
        if group != found.group() || !found.versions().contains(&version) {
            return Err(format!(
                "{kind} is served as {} (versions {}), not {api_version:?}",
                found.group(),
                found.versions().join(", ")
            ));
        }
        Ok(found)
    }

    /// Finds a kind by plural, singular (case-insensitive) or short name, as the CLI and the
    /// API paths name it.
    pub fn from_resource_name(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            k.plural() == lower || k.name().to_ascii_lowercase() == lower || k.short_names().contains(&lower.as_str())
        })
    }

    /// Finds a kind from the group and plural of an API path.
    pub fn from_group_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.group() == group && k.plural() == plural)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_istio_networking_version_is_served() {
        for v in ["v1", "v1beta1", "v1alpha3"] {
            let api = format!("networking.istio.io/{v}");
            assert_eq!(Kind::from_type(&api, "VirtualService").unwrap(), Kind::VirtualService);
        }
        assert!(Kind::from_type("security.istio.io/v1", "VirtualService").is_err());
        assert!(Kind::from_type("networking.istio.io/v2", "VirtualService").is_err());
        assert!(Kind::from_type("networking.istio.io/v1", "Service").unwrap_err().contains("unknown kind"));
    }

    #[test]
    fn resource_names_resolve_like_kubectl() {
        assert_eq!(Kind::from_resource_name("vs"), Some(Kind::VirtualService));
        assert_eq!(Kind::from_resource_name("VirtualServices"), Some(Kind::VirtualService));
        assert_eq!(Kind::from_resource_name("destinationrule"), Some(Kind::DestinationRule));
        assert_eq!(Kind::from_resource_name("nothing"), None);
        assert_eq!(Kind::from_group_plural("trellis.dev", "meshclusters"), Some(Kind::MeshCluster));
    }
}
