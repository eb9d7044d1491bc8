//! `trellis filter new` writes a crate that builds for wasm32-wasip1 and loads and behaves in
//! the real host (its own host-side tests are what `cargo test -p NAME-tests` runs; here the
//! same checks run through the testkit directly, without compiling the host again).

use std::process::Command;

use serde_json::json;
use trellis_filter_testkit::{Action, Filter, build};

#[test]
fn a_scaffolded_filter_builds_loads_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("greeter");
    let out = Command::new(trellis_e2e::binary("trellis").unwrap())
        .args(["filter", "new", "greeter", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cargo test -p greeter-tests"));
    let wasm = build(dir.join("Cargo.toml"), "greeter").expect("the scaffold builds for wasm32-wasip1");
    let mut vm = Filter::from_file(&wasm)
        .unwrap()
        .config(json!({"header": "x-greeter", "denyPrefix": "/admin"}))
        .start()
        .unwrap();
    let ex = vm.request().path("/hello").send().unwrap();
    assert_eq!(ex.request_header("x-greeter").as_deref(), Some("1"));
    let ex = vm.request().path("/admin/x").send().unwrap();
    assert_eq!(ex.action, Action::Pause);
    assert_eq!(ex.local_reply().map(|r| r.status), Some(403));
    // Running it again refuses to overwrite.
    let again = Command::new(trellis_e2e::binary("trellis").unwrap())
        .args(["filter", "new", "greeter", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already exists"));
}
