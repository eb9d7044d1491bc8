//! The built-in filters (filters/fault, retry, mirror, auth) in the real host, with the
//! configuration trellis-proxy gives them: per route (keyed by `route_name`) for fault, retry
//! and mirror; the RBAC filters' stages for auth.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;
use trellis_filter_testkit::{Action, Callout, Filter, VmError, build};
use trellis_wasm_host::Stream;

fn module(name: &'static str) -> Filter {
    static BUILT: OnceLock<()> = OnceLock::new();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../filters/Cargo.toml");
    BUILT.get_or_init(|| {
        for p in ["fault", "retry", "mirror", "auth"] {
            build(&manifest, p).unwrap_or_else(|e| panic!("build {p}: {e}"));
        }
    });
    Filter::from_file(manifest.parent().unwrap().join(format!("target/wasm32-wasip1/wasm/{name}.wasm"))).unwrap()
}

#[test]
fn fault_aborts_only_its_route_with_the_status_or_grpc_status() {
    let f = module("fault").config(json!({"routes": {
        "abort": {"abort": {"httpStatus": 418, "percentage": 100}},
        "grpc": {"abort": {"grpcStatus": 14}}}}));
    let mut vm = f.start().unwrap();
    let ex = vm.request().route("abort").send().unwrap();
    let reply = ex.local_reply().expect("aborted");
    assert_eq!((reply.status, String::from_utf8_lossy(&reply.body).as_ref()), (418, "fault filter abort"));
    let ex = vm.request().route("grpc").send().unwrap();
    let reply = ex.local_reply().expect("aborted");
    assert_eq!((reply.status, reply.grpc_status), (200, 14));
    let ex = vm.request().route("other").send().unwrap();
    assert_eq!(ex.action, Action::Continue);
    assert!(ex.local_reply().is_none());
    let ex = vm.request().send().unwrap();
    assert!(ex.local_reply().is_none(), "no route name, no fault");
    assert_eq!(vm.metric("fault.aborts_injected"), Some(2));
}

#[test]
fn fault_delays_then_continues_or_aborts() {
    let f = module("fault").config(json!({"routes": {
        "slow": {"delay": {"fixedDelayMs": 80}},
        "slow-then-fail": {"delay": {"fixedDelayMs": 40}, "abort": {"httpStatus": 503}}}}));
    let mut vm = f.start().unwrap();
    let mut ex = vm.request().route("slow").send().unwrap();
    assert_eq!(ex.action, Action::Pause);
    let took = ex.run_timers(Duration::from_secs(5)).unwrap().expect("resumed");
    assert!(took >= Duration::from_millis(75), "resumed after {took:?}");
    assert!(ex.resumed(true) && ex.local_reply().is_none());
    ex.finish().unwrap();
    let mut ex = vm.request().route("slow-then-fail").send().unwrap();
    assert_eq!(ex.action, Action::Pause);
    assert!(ex.local_reply().is_none(), "the abort comes after the delay");
    let took = ex.run_timers(Duration::from_secs(5)).unwrap().expect("answered");
    assert!(took >= Duration::from_millis(35), "answered after {took:?}");
    assert_eq!(ex.local_reply().map(|r| r.status), Some(503));
    ex.finish().unwrap();
    assert_eq!(vm.vm().tick_period(), None, "no ticks once no stream is held");
}

#[test]
fn fault_percentages_hold_over_many_requests() {
    let f = module("fault").config(json!({"routes": {"r": {"abort": {"httpStatus": 500, "percentage": 25}}, "never": {"abort": {"httpStatus": 500, "percentage": 0}}}}));
    let mut vm = f.start().unwrap();
    let mut aborted = 0;
    for _ in 0..800 {
        let ex = vm.request().route("r").send().unwrap();
        aborted += usize::from(ex.local_reply().is_some());
        ex.finish().unwrap();
        let ex = vm.request().route("never").send().unwrap();
        assert!(ex.local_reply().is_none());
        ex.finish().unwrap();
    }
    // 800 draws at 25%: mean 200, sd ≈ 12; 5 sd either way.
    assert!((140..=260).contains(&aborted), "{aborted} of 800 aborted at 25%");
}

#[test]
fn fault_refuses_an_unknown_field() {
    let err = module("fault").config(json!({"routes": {"r": {"abort": {"status": 500}}}})).start().unwrap_err();
    assert!(matches!(err, VmError::Refused { .. }) && err.to_string().contains("unknown field `status`"), "{err}");
}

#[test]
fn retry_resends_up_to_its_attempts_with_backoff() {
    let f = module("retry").config(json!({"routes": {"r": {"attempts": 2, "retryOn": ["5xx"], "backoffBaseMs": 20}}}));
    let mut vm = f.start().unwrap();
    let ex = vm.request().route("r").send().unwrap();
    assert!(ex.request_retained(), "the request is kept for a re-send");
    let mut ex = ex.respond(503).unwrap();
    let first = ex.resend_requested().expect("first retry");
    assert!(first <= Duration::from_millis(20), "{first:?}");
    let mut ex = ex.respond(502).unwrap();
    let second = ex.resend_requested().expect("second retry");
    assert!(second <= Duration::from_millis(40), "{second:?}");
    let mut ex = ex.respond(503).unwrap();
    assert_eq!(ex.resend_requested(), None, "attempts exhausted");
    assert_eq!(ex.action, Action::Continue);
    ex.finish().unwrap();
    assert_eq!(vm.metric("retry.upstream_rq_retry"), Some(2));
    assert_eq!(vm.metric("retry.upstream_rq_retry_limit_exceeded"), Some(1));
    let mut ex = vm.request().route("r").send().unwrap().respond(200).unwrap();
    assert_eq!(ex.resend_requested(), None);
    ex.finish().unwrap();
    let ex = vm.request().route("elsewhere").send().unwrap();
    assert!(!ex.request_retained(), "no policy, nothing kept");
}

#[test]
fn retry_on_decides_by_status_flags_and_grpc_status() {
    let f = module("retry").config(json!({"routes": {
        "cf": {"attempts": 1, "retryOn": ["connect-failure"]},
        "codes": {"attempts": 1, "retryOn": ["retriable-status-codes"], "retriableStatusCodes": [429]},
        "grpc": {"attempts": 1, "retryOn": ["unavailable"]},
        "hdr": {"attempts": 1, "retryOn": ["retriable-headers"], "retriableHeaders": [{"name": "x-retry", "exact": "yes"}]},
        "all": {"attempts": 1, "retryOn": ["5xx", "retriable-status-codes"], "retriableStatusCodes": [503]}}}));
    let mut vm = f.start().unwrap();
    let uf = 0x20u64.to_le_bytes();
    let uo = 0x80u64.to_le_bytes();
    let mut case = |route: &str, status: u16, headers: &[(&str, &str)], flags: Option<&[u8]>| {
        let mut ex = vm.request().route(route).send().unwrap();
        if let Some(f) = flags {
            ex = ex.property("response.flags", f);
        }
        let mut ex = ex.respond_with(status, headers).unwrap();
        let r = ex.resend_requested().is_some();
        ex.finish().unwrap();
        r
    };
    assert!(case("cf", 503, &[], Some(&uf)), "a connection failure is retried");
    assert!(!case("cf", 503, &[], None), "an upstream 503 is not a connect failure");
    assert!(case("codes", 429, &[], None));
    assert!(!case("codes", 500, &[], None));
    assert!(case("grpc", 200, &[("grpc-status", "14")], None));
    assert!(!case("grpc", 200, &[("grpc-status", "3")], None));
    assert!(case("hdr", 500, &[("x-retry", "yes")], None));
    assert!(!case("hdr", 500, &[("x-retry", "no")], None));
    assert!(case("all", 503, &[], None));
    assert!(!case("all", 503, &[], Some(&uo)), "circuit-breaker overflow is the proxy's own answer, never retried");
}

#[test]
fn retry_budget_caps_retries_in_flight() {
    let f = module("retry")
        .config(json!({"routes": {"r": {"attempts": 5, "retryOn": ["5xx"]}}, "budget": {"percent": 20, "minRetryConcurrency": 3}}));
    retry_budget_case(f);
}

#[test]
fn retry_budget_counts_with_shared_data_cas_on_other_hosts() {
    let f = module("retry")
        .config(json!({"routes": {"r": {"attempts": 5, "retryOn": ["5xx"]}}, "budget": {"percent": 20, "minRetryConcurrency": 3}}))
        .without_functions(&["trellis.shared_add"]);
    retry_budget_case(f);
}

fn retry_budget_case(f: Filter) {
    let mut running = f.start().unwrap();
    let vm = running.vm();
    let mut ids = Vec::new();
    for _ in 0..10 {
        let mut s = Stream {
            request_headers: vec![(":method".into(), b"GET".to_vec()), (":path".into(), b"/".to_vec())].into(),
            ..Default::default()
        };
        s.properties.insert("route_name".into(), b"r".to_vec());
        let id = vm.create_stream(s).unwrap();
        vm.on_request_headers(id, true).unwrap();
        ids.push(id);
    }
    let mut resent = 0;
    for id in &ids {
        vm.stream_mut(*id).unwrap().response_headers = vec![(":status".into(), b"503".to_vec())].into();
        vm.on_response_headers(*id, true).unwrap();
        resent += usize::from(vm.stream_mut(*id).unwrap().resend.take().is_some());
    }
    // 10 requests in flight: 20% is 2, the floor is 3.
    assert_eq!(resent, 3, "retries in flight beyond the budget");
    assert_eq!(running.metric("retry.upstream_rq_retry_overflow"), Some(7));
    let vm = running.vm();
    for id in ids {
        vm.finish_stream(id).unwrap();
    }
    // All done: the budget is whole again.
    let mut ex = running.request().route("r").send().unwrap().respond(503).unwrap();
    assert!(ex.resend_requested().is_some());
}

#[test]
fn retry_refuses_an_unknown_retry_on() {
    let err =
        module("retry").config(json!({"routes": {"r": {"attempts": 1, "retryOn": ["5xxx"]}}})).start().unwrap_err();
    assert!(err.to_string().contains("retryOn \"5xxx\""), "{err}");
}

#[test]
fn mirror_sends_a_shadow_copy_with_the_body_and_never_waits() {
    let f = module("mirror").config(json!({"routes": {"r": [{"cluster": "outbound|80|v2|svc", "percentage": 100}], "none": [{"cluster": "c", "percentage": 0}]}}));
    let mut vm = f.start().unwrap();
    let mut ex = vm.request().route("r").authority("svc.ns:9080").path("/p").send().unwrap();
    assert_eq!(ex.action, Action::Continue, "the primary request goes on");
    let calls = ex.callouts();
    let [Callout::Http { upstream, headers, body, .. }] = calls.as_slice() else { panic!("{calls:?}") };
    assert_eq!(upstream, "outbound|80|v2|svc");
    let authority =
        headers.iter().find(|(k, _)| k == ":authority").map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    assert_eq!(authority.as_deref(), Some("svc.ns-shadow:9080"));
    assert!(body.is_empty());
    ex.finish().unwrap();
    let mut ex = vm.request().route("r").method("POST").authority("svc").body(b"payload").send().unwrap();
    let calls = ex.callouts();
    let [Callout::Http { body, headers, .. }] = calls.as_slice() else { panic!("{calls:?}") };
    assert_eq!(body, b"payload");
    assert!(headers.iter().any(|(k, v)| k == ":authority" && v == b"svc-shadow"));
    ex.finish().unwrap();
    for route in ["none", "other"] {
        let mut ex = vm.request().route(route).send().unwrap();
        assert!(ex.callouts().is_empty(), "route {route} is not mirrored");
        ex.finish().unwrap();
    }
    assert_eq!(vm.metric("mirror.requests_sent"), Some(2));
}

/// An auth module with these stages; requests come from `peer` (source.address).
fn auth(stages: serde_json::Value) -> trellis_filter_testkit::Running {
    module("auth").config(json!({ "stages": stages })).start().unwrap()
}

fn status(
    vm: &mut trellis_filter_testkit::Running,
    req: impl FnOnce(trellis_filter_testkit::RequestBuilder<'_>) -> trellis_filter_testkit::RequestBuilder<'_>,
) -> u32 {
    let b = vm.request().property("source.address", b"10.1.2.3:5555");
    let ex = req(b).send().unwrap();
    let s = ex.local_reply().map(|r| r.status).unwrap_or(200);
    ex.finish().unwrap();
    s
}

#[test]
fn auth_an_allow_stage_without_policies_denies_everything() {
    // Istio's allow-nothing: `spec: {}` → an ALLOW RBAC filter with no policies.
    let mut vm = auth(json!([{"action": "ALLOW", "policies": {}}]));
    assert_eq!(status(&mut vm, |r| r.path("/anything")), 403);
    let ex = vm.request().send().unwrap();
    assert_eq!(String::from_utf8_lossy(&ex.local_reply().unwrap().body), "RBAC: access denied");
    ex.finish().unwrap();
    // No stages at all: nothing is enforced.
    let mut open = auth(json!([]));
    assert_eq!(status(&mut open, |r| r.path("/anything")), 200);
}

#[test]
fn auth_deny_comes_before_allow_and_allow_denies_what_it_does_not_match() {
    let any = json!([{"any": true}]);
    let mut vm = auth(json!([
        {"action": "DENY", "policies": {"no-secrets": {"permissions": [{"path": {"prefix": "/reviews/secret"}}], "principals": any}}},
        {"action": "ALLOW", "policies": {
            "get-reviews": {"permissions": [{"and": [
                {"header": {"name": ":method", "match": {"exact": "GET"}}},
                {"or": [{"path": {"prefix": "/reviews/"}}, {"path": {"exact": "/health"}}]}]}],
                "principals": [{"directRemoteIp": "10.0.0.0/8"}]},
            "alice-posts": {"permissions": [{"and": [
                {"header": {"name": ":method", "match": {"exact": "POST"}}},
                {"header": {"name": "x-user", "match": {"exact": "alice"}}}]}],
                "principals": any}}}]));
    assert_eq!(status(&mut vm, |r| r.path("/reviews/1")), 200);
    assert_eq!(status(&mut vm, |r| r.path("/health?verbose=1")), 200, "paths match without the query");
    assert_eq!(status(&mut vm, |r| r.path("/reviews/secret-plans")), 403, "DENY wins over ALLOW");
    assert_eq!(status(&mut vm, |r| r.path("/ratings")), 403, "no ALLOW rule matches");
    assert_eq!(status(&mut vm, |r| r.method("POST").path("/reviews/1")), 403);
    assert_eq!(status(&mut vm, |r| r.method("POST").path("/x").header("x-user", "alice")), 200);
    let mut other_net = vm.request().property("source.address", b"192.168.1.1:5555").path("/reviews/1").send().unwrap();
    assert_eq!(other_net.local_reply().map(|r| r.status), Some(403), "ipBlocks");
    assert!(other_net.callouts().is_empty());
    other_net.finish().unwrap();
    assert_eq!(vm.metric("auth.denied"), Some(4));
}

#[test]
fn auth_principals_and_namespaces_come_from_the_peer_identity() {
    // What Istio emits for `from: [{source: {principals: [...]}}, {source: {namespaces: [...]}}]`
    // after trellis-proxy's conversion.
    let mut vm = auth(json!([{"action": "ALLOW", "policies": {"p": {
        "permissions": [{"any": true}],
        "principals": [{"or": [
            {"principal": {"exact": "spiffe://cluster.local/ns/bookinfo/sa/productpage"}},
            {"principal": {"contains": "/ns/monitoring/"}}]}]}}}]));
    assert_eq!(status(&mut vm, |r| r.peer_principal("spiffe://cluster.local/ns/bookinfo/sa/productpage")), 200);
    assert_eq!(status(&mut vm, |r| r.peer_principal("spiffe://cluster.local/ns/monitoring/sa/prometheus")), 200);
    assert_eq!(status(&mut vm, |r| r.peer_principal("spiffe://cluster.local/ns/bookinfo/sa/reviews")), 403);
    assert_eq!(status(&mut vm, |r| r), 403, "no mTLS, no principal: principal rules never match");
    // notPrincipals: everyone but one.
    let mut not = auth(json!([{"action": "DENY", "policies": {"p": {"permissions": [{"any": true}],
        "principals": [{"not": {"principal": {"exact": "spiffe://cluster.local/ns/a/sa/admin"}}}]}}}]));
    assert_eq!(status(&mut not, |r| r.peer_principal("spiffe://cluster.local/ns/a/sa/admin")), 200);
    assert_eq!(status(&mut not, |r| r.peer_principal("spiffe://cluster.local/ns/a/sa/user")), 403);
}

#[test]
fn auth_audit_lets_requests_through_and_counts_them() {
    let mut vm = auth(
        json!([{"action": "LOG", "policies": {"watch": {"permissions": [{"path": {"prefix": "/admin"}}], "principals": [{"any": true}]}}}]),
    );
    assert_eq!(status(&mut vm, |r| r.path("/admin/x")), 200);
    assert_eq!(status(&mut vm, |r| r.path("/other")), 200);
    assert_eq!(vm.metric("auth.audited"), Some(1));
}

#[test]
fn auth_hosts_ports_and_remote_ips() {
    let mut vm = auth(json!([{"action": "ALLOW", "policies": {"p": {
        "permissions": [{"and": [
            {"or": [{"header": {"name": ":authority", "match": {"exact": "shop.example.com", "ignoreCase": true}}},
                    {"header": {"name": ":authority", "match": {"prefix": "shop.example.com:", "ignoreCase": true}}}]},
            {"destinationPort": 9080}]}],
        "principals": [{"remoteIp": "203.0.113.0/24"}]}}}]));
    fn ok(r: trellis_filter_testkit::RequestBuilder<'_>) -> trellis_filter_testkit::RequestBuilder<'_> {
        r.property("destination.port", &9080i64.to_le_bytes()).header("x-forwarded-for", "203.0.113.7, 10.0.0.1")
    }
    assert_eq!(status(&mut vm, |r| ok(r).authority("SHOP.example.com:9080")), 200);
    assert_eq!(status(&mut vm, |r| ok(r).authority("shop.example.com")), 200);
    assert_eq!(status(&mut vm, |r| ok(r).authority("other.example.com")), 403);
    assert_eq!(
        status(&mut vm, |r| r
            .authority("shop.example.com")
            .property("destination.port", &80i64.to_le_bytes())
            .header("x-forwarded-for", "203.0.113.7")),
        403
    );
    assert_eq!(
        status(&mut vm, |r| r.authority("shop.example.com").property("destination.port", &9080i64.to_le_bytes())),
        403,
        "remote IP is the peer without x-forwarded-for"
    );
}

#[test]
fn auth_refuses_a_policy_it_cannot_evaluate() {
    let err = module("auth")
        .config(json!({"stages": [{"action": "ALLOW", "policies": {"p": {"permissions": [{"path": {"regex": ".*"}}], "principals": [{"any": true}]}}}]}))
        .start()
        .unwrap_err();
    assert!(err.to_string().contains("unknown field `regex`"), "{err}");
    let err = module("auth")
        .config(json!({"stages": [{"action": "ALLOW", "policies": {"p": {"permissions": [], "principals": [{"any": true}]}}}]}))
        .start()
        .unwrap_err();
    assert!(err.to_string().contains("policy p: needs at least one permission"), "{err}");
}
