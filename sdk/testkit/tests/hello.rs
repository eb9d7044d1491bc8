//! The SDK's example filter (filters/hello) through the testkit: what a filter author's tests
//! look like.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::json;
use trellis_filter_testkit::{Action, Filter, VmError, build};

fn hello() -> Filter {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        build(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../filters/Cargo.toml"), "hello").expect("build hello")
    });
    Filter::from_file(path).unwrap()
}

#[test]
fn the_filter_stamps_requests_and_marks_responses() {
    let filter = hello().config(json!({"header": "x-team", "value": "payments"}));
    let mut vm = filter.start().unwrap();
    let ex = vm.request().path("/pay").header("x-user", "a").send().unwrap();
    assert_eq!(ex.action, Action::Continue);
    assert_eq!(ex.request_header("x-team").as_deref(), Some("payments"));
    assert!(ex.local_reply().is_none());
    let ex = ex.respond(201).unwrap();
    assert_eq!(ex.response_header("x-hello-seen").as_deref(), Some("201"));
    ex.finish().unwrap();
    assert_eq!(vm.metric("hello_requests"), Some(1));
}

#[test]
fn a_denied_path_gets_a_local_reply_naming_the_peer() {
    let mut vm = hello().config(json!({"header": "x-h", "value": "v", "denyPrefix": "/admin"})).start().unwrap();
    let ex = vm.request().path("/admin/users").peer_principal("spiffe://cluster.local/ns/shop/sa/web").send().unwrap();
    assert_eq!(ex.action, Action::Pause);
    let reply = ex.local_reply().expect("a 403");
    assert_eq!(reply.status, 403);
    assert_eq!(String::from_utf8_lossy(&reply.body), "spiffe://cluster.local/ns/shop/sa/web may not");
    assert!(reply.headers.iter().any(|(k, v)| k == "x-denied-by" && v == b"hello"));
    assert_eq!(vm.metric("hello_denied"), Some(1));
}

#[test]
fn a_configuration_with_an_unknown_field_is_refused_with_serdes_message() {
    let err = hello().config(json!({"header": "x", "value": "y", "denyPrefx": "/a"})).start().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, VmError::Refused { .. }), "{text}");
    assert!(text.contains("unknown field `denyPrefx`"), "{text}");
}
