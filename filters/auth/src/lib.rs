//! The built-in authorization filter: AuthorizationPolicy as Istio documents it, carried as
//! Envoy's RBAC filters (the control plane emits those; trellis-proxy turns them into this
//! filter's configuration, and the module runs in Envoy as well).
//!
//! The configuration is a list of stages, one per RBAC filter, in order: `LOG` (AUDIT)
//! counts matches and lets everything through, `DENY` answers 403 when any of its policies
//! matches, `ALLOW` answers 403 unless one matches (no policies: everything is denied). A
//! policy matches when any of its permissions (about the request) and any of its principals
//! (about the peer) match; both are trees of and / or / not over matchers.
//!
//! ```json
//! {"stages": [{"action": "ALLOW", "policies": {"allow-get": {
//!     "permissions": [{"header": {"name": ":method", "match": {"exact": "GET"}}}],
//!     "principals": [{"principal": {"suffix": "/ns/bookinfo/sa/productpage"}}]}}}]}
//! ```
//!
//! What it reads (Envoy's attributes): the request headers (`:method`, `:authority`, `:path`
//! without its query for path matches), `source.address` (the direct peer), the first
//! `x-forwarded-for` entry for `remoteIp` (else the peer), `destination.address` /
//! `destination.port`, `connection.requested_server_name`, and the peer's SPIFFE identity
//! (`connection.uri_san_peer_certificate`, or `source.principal`) — absent without mTLS, so
//! principal matchers do not match then.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::rc::Rc;

use serde::Deserialize;
use trellis_sdk::{Counter, Decision, Filter, LocalReply, Request};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    stages: Rc<Vec<Stage>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    action: StageAction,
    #[serde(default)]
    policies: BTreeMap<String, Policy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum StageAction {
    Allow,
    Deny,
    Log,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    permissions: Vec<Perm>,
    principals: Vec<Peer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
enum Perm {
    Any(bool),
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(HeaderMatch),
    Path(Match),
    DestinationPort(u32),
    DestinationIp(String),
    Sni(Match),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
enum Peer {
    Any(bool),
    And(Vec<Peer>),
    Or(Vec<Peer>),
    Not(Box<Peer>),
    Principal(Match),
    DirectRemoteIp(String),
    RemoteIp(String),
    Header(HeaderMatch),
    Path(Match),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderMatch {
    name: String,
    /// `None`: the header is present.
    #[serde(rename = "match")]
    matcher: Option<Match>,
    #[serde(default)]
    invert: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Match {
    exact: Option<String>,
    prefix: Option<String>,
    suffix: Option<String>,
    contains: Option<String>,
    /// Any non-empty value.
    #[serde(default)]
    non_empty: bool,
    #[serde(default)]
    ignore_case: bool,
}

impl Match {
    fn check(&self) -> Result<(), String> {
        let n = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.suffix.is_some(),
            self.contains.is_some(),
            self.non_empty,
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n == 1 {
            Ok(())
        } else {
            Err("a match needs exactly one of exact, prefix, suffix, contains, nonEmpty".into())
        }
    }

    fn matches(&self, v: &str) -> bool {
        let (v, fold) = if self.ignore_case { (v.to_ascii_lowercase(), true) } else { (v.to_string(), false) };
        let f = |s: &String| if fold { s.to_ascii_lowercase() } else { s.clone() };
        if let Some(e) = &self.exact {
            return v == f(e);
        }
        if let Some(p) = &self.prefix {
            return v.starts_with(&f(p));
        }
        if let Some(s) = &self.suffix {
            return v.ends_with(&f(s));
        }
        if let Some(c) = &self.contains {
            return v.contains(&f(c));
        }
        self.non_empty && !v.is_empty()
    }
}

/// `ip` in `cidr` (`a.b.c.d/n`, IPv6 too; a bare address is a /32 or /128).
fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (net, len) = match cidr.split_once('/') {
        Some((n, l)) => (n, l.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else { return false };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn check_tree_match(m: &Match) -> Result<(), String> {
    m.check()
}

/// What a request looks like to the matchers, each attribute read from the host the first
/// time a matcher needs it (most policies look at one or two).
struct Seen<'a> {
    req: &'a Request,
    path: OnceCell<String>,
    peer: OnceCell<Option<IpAddr>>,
    remote: OnceCell<Option<IpAddr>>,
    destination: OnceCell<Option<IpAddr>>,
    destination_port: OnceCell<Option<u32>>,
    sni: OnceCell<String>,
    principal: OnceCell<Option<String>>,
}

fn le_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn ip_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<std::net::SocketAddr>().map(|a| a.ip()).ok().or_else(|| addr.parse().ok())
}

impl<'a> Seen<'a> {
    fn of(req: &'a Request) -> Seen<'a> {
        Seen {
            req,
            path: OnceCell::new(),
            peer: OnceCell::new(),
            remote: OnceCell::new(),
            destination: OnceCell::new(),
            destination_port: OnceCell::new(),
            sni: OnceCell::new(),
            principal: OnceCell::new(),
        }
    }

    fn text(&self, p: &[&str]) -> Option<String> {
        self.req.property(p).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn path(&self) -> &str {
        self.path.get_or_init(|| self.req.path().split(['?', '#']).next().unwrap_or("").to_string())
    }

    fn peer(&self) -> Option<IpAddr> {
        *self.peer.get_or_init(|| self.text(&["source", "address"]).and_then(|a| ip_of(&a)))
    }

    fn remote(&self) -> Option<IpAddr> {
        *self.remote.get_or_init(|| {
            self.req
                .header("x-forwarded-for")
                .and_then(|x| x.split(',').next().and_then(|f| f.trim().parse().ok()))
                .or(self.peer())
        })
    }

    fn destination(&self) -> Option<IpAddr> {
        *self.destination.get_or_init(|| self.text(&["destination", "address"]).and_then(|a| ip_of(&a)))
    }

    fn destination_port(&self) -> Option<u32> {
        *self
            .destination_port
            .get_or_init(|| self.req.property(&["destination", "port"]).and_then(|b| le_u64(&b)).map(|p| p as u32))
    }

    fn sni(&self) -> &str {
        self.sni.get_or_init(|| self.text(&["connection", "requested_server_name"]).unwrap_or_default())
    }

    fn principal(&self) -> Option<&str> {
        self.principal.get_or_init(|| self.req.peer_principal()).as_deref()
    }
}

fn header_matches(req: &Request, h: &HeaderMatch) -> bool {
    let value = req.header(&h.name);
    let hit = match (&value, &h.matcher) {
        (Some(v), Some(m)) => m.matches(v),
        (Some(_), None) => true,
        (None, _) => false,
    };
    hit != h.invert
}

impl Perm {
    fn check(&self) -> Result<(), String> {
        match self {
            Perm::And(v) | Perm::Or(v) => v.iter().try_for_each(Perm::check),
            Perm::Not(p) => p.check(),
            Perm::Header(h) => h.matcher.as_ref().map_or(Ok(()), check_tree_match),
            Perm::Path(m) | Perm::Sni(m) => m.check(),
            _ => Ok(()),
        }
    }

    fn matches(&self, req: &Request, s: &Seen<'_>) -> bool {
        match self {
            Perm::Any(a) => *a,
            Perm::And(v) => v.iter().all(|p| p.matches(req, s)),
            Perm::Or(v) => v.iter().any(|p| p.matches(req, s)),
            Perm::Not(p) => !p.matches(req, s),
            Perm::Header(h) => header_matches(req, h),
            Perm::Path(m) => m.matches(s.path()),
            Perm::DestinationPort(p) => s.destination_port() == Some(*p),
            Perm::DestinationIp(c) => s.destination().is_some_and(|ip| in_cidr(ip, c)),
            Perm::Sni(m) => m.matches(s.sni()),
        }
    }
}

impl Peer {
    fn check(&self) -> Result<(), String> {
        match self {
            Peer::And(v) | Peer::Or(v) => v.iter().try_for_each(Peer::check),
            Peer::Not(p) => p.check(),
            Peer::Header(h) => h.matcher.as_ref().map_or(Ok(()), check_tree_match),
            Peer::Principal(m) | Peer::Path(m) => m.check(),
            _ => Ok(()),
        }
    }

    fn matches(&self, req: &Request, s: &Seen<'_>) -> bool {
        match self {
            Peer::Any(a) => *a,
            Peer::And(v) => v.iter().all(|p| p.matches(req, s)),
            Peer::Or(v) => v.iter().any(|p| p.matches(req, s)),
            Peer::Not(p) => !p.matches(req, s),
            Peer::Principal(m) => s.principal().is_some_and(|p| m.matches(p)),
            Peer::DirectRemoteIp(c) => s.peer().is_some_and(|ip| in_cidr(ip, c)),
            Peer::RemoteIp(c) => s.remote().is_some_and(|ip| in_cidr(ip, c)),
            Peer::Header(h) => header_matches(req, h),
            Peer::Path(m) => m.matches(s.path()),
        }
    }
}

impl Policy {
    fn matches(&self, req: &Request, s: &Seen<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(req, s)) && self.principals.iter().any(|p| p.matches(req, s))
    }
}

struct Auth {
    config: Config,
}

/// The filter's metrics, defined once per VM (a filter is made per request).
struct Counters {
    allowed: Counter,
    denied: Counter,
    audited: Counter,
}

fn counters() -> &'static Counters {
    static COUNTERS: std::sync::OnceLock<Counters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        allowed: Counter::define("auth.allowed"),
        denied: Counter::define("auth.denied"),
        audited: Counter::define("auth.audited"),
    })
}

fn denied() -> Decision {
    Decision::Reply(LocalReply::new(403).body("RBAC: access denied"))
}

impl Filter for Auth {
    /// Nothing to do at a stream's end (Trellis's host then skips on_log / on_done).
    const SEES_DONE: bool = false;

    /// Never looks at responses (Trellis's host then skips on_response_headers).
    const SEES_RESPONSE: bool = false;

    type Config = Config;

    fn new(config: &Config) -> Self {
        // Defined with the first stream, so they show (at 0) before anything happens.
        counters();
        Auth { config: config.clone() }
    }

    fn check(config: &Config) -> Result<(), String> {
        for stage in config.stages.iter() {
            for (name, p) in &stage.policies {
                if p.permissions.is_empty() || p.principals.is_empty() {
                    return Err(format!("policy {name}: needs at least one permission and one principal"));
                }
                p.permissions.iter().try_for_each(Perm::check).map_err(|e| format!("policy {name}: {e}"))?;
                p.principals.iter().try_for_each(Peer::check).map_err(|e| format!("policy {name}: {e}"))?;
            }
        }
        Ok(())
    }

    fn on_request(&mut self, req: &mut Request) -> Decision {
        if self.config.stages.is_empty() {
            return Decision::Continue;
        }
        let seen = Seen::of(req);
        for stage in self.config.stages.iter() {
            let hit = stage.policies.iter().find(|(_, p)| p.matches(req, &seen)).map(|(n, _)| n);
            match (stage.action, hit) {
                (StageAction::Log, Some(name)) => {
                    counters().audited.inc(1);
                    trellis_sdk::log::info!("audit: {name} matched {} {}", req.method(), seen.path());
                }
                (StageAction::Log, None) => {}
                (StageAction::Deny, Some(_)) | (StageAction::Allow, None) => {
                    counters().denied.inc(1);
                    return denied();
                }
                (StageAction::Deny, None) | (StageAction::Allow, Some(_)) => {}
            }
        }
        counters().allowed.inc(1);
        Decision::Continue
    }
}

trellis_sdk::register!(Auth);
