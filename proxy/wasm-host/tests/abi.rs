//! The host against a real module built with the upstream `proxy-wasm` crate (filters/abi-probe,
//! compiled for wasm32-wasip1 once per test run), and against hostile modules written in WAT.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use trellis_wasm_host::abi::{LogLevel, StreamType};
use trellis_wasm_host::{Action, Callout, GrpcOp, Host, Limits, LoadError, PluginConfig, Stream, Vm, VmError};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds filters/abi-probe (its own workspace and target directory) once per test binary.
fn probe() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let manifest = root().join("filters/Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "abi-probe",
                "--target",
                "wasm32-wasip1",
                "--profile",
                "wasm",
                "--manifest-path",
            ])
            .arg(&manifest)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .expect("cargo");
        assert!(
            out.status.success(),
            "building abi-probe failed (is the wasm32-wasip1 target installed? scripts/setup.sh adds it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(root().join("filters/target/wasm32-wasip1/wasm/abi_probe.wasm")).expect("abi_probe.wasm")
    })
}

fn host() -> Host {
    Host::new().expect("host")
}

fn plugin(config: &str, vm_id: &str) -> PluginConfig {
    PluginConfig {
        name: "probe".into(),
        root_id: String::new(),
        vm_id: vm_id.into(),
        configuration: config.as_bytes().to_vec(),
        vm_configuration: Vec::new(),
    }
}

const CONFIG: &str = r#"{"header": "x-probe-resp", "deny": "/deny"}"#;

fn start(h: &Host, vm_id: &str) -> Vm {
    let m = h.load(probe(), None).unwrap();
    Vm::start(h, m, plugin(CONFIG, vm_id), Limits::default()).unwrap()
}

fn request(path: &str, headers: &[(&str, &str)]) -> Stream {
    let mut s = Stream {
        request_headers: vec![(":method".into(), b"GET".to_vec()), (":path".into(), path.as_bytes().to_vec())].into(),
        ..Default::default()
    };
    Arc::make_mut(&mut s.request_headers).extend(headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())));
    s.properties.insert("request.path".into(), path.as_bytes().to_vec());
    s
}

fn header<'a>(pairs: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[test]
fn headers_properties_metrics_and_logs_work_through_the_upstream_sdk() {
    let h = host();
    let mut vm = start(&h, "a");
    let id = vm.create_stream(request("/hello", &[("x-in", "42"), ("x-remove", "gone")])).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Continue);
    let s = vm.stream(id).unwrap();
    assert_eq!(header(&s.request_headers, "x-probe"), Some("seen:42"));
    assert_eq!(header(&s.request_headers, "x-remove"), None);
    assert!(
        vm.state().logs.iter().any(|(l, m)| *l == LogLevel::Info && m == "request /hello"),
        "{:?}",
        vm.state().logs
    );
    vm.stream_mut(id).unwrap().response_headers = vec![(":status".into(), b"200".to_vec())].into();
    assert_eq!(vm.on_response_headers(id, true).unwrap(), Action::Continue);
    assert_eq!(header(&vm.stream(id).unwrap().response_headers, "x-probe-resp"), Some("1"));
    vm.finish_stream(id).unwrap();
    assert!(vm.stream(id).is_none());
    let id = vm.create_stream(request("/again", &[])).unwrap();
    vm.on_request_headers(id, true).unwrap();
    assert_eq!(h.metrics().get("probe_requests"), Some(2));
}

#[test]
fn a_filter_can_answer_locally() {
    let h = host();
    let mut vm = start(&h, "a");
    let id = vm.create_stream(request("/deny", &[])).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Pause);
    let local = vm.stream(id).unwrap().local_response.clone().expect("a local response");
    assert_eq!((local.status, local.body.as_slice()), (403, &b"denied"[..]));
    assert_eq!(header(&local.headers, "x-denied-by"), Some("probe"));
}

#[test]
fn http_callouts_are_handed_to_the_embedder_and_their_response_resumes_the_stream() {
    let h = host();
    let mut vm = start(&h, "a");
    let id = vm.create_stream(request("/callout", &[])).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Pause);
    let callouts = vm.take_callouts();
    let [Callout::Http { token, context, upstream, headers, .. }] = callouts.as_slice() else { panic!("{callouts:?}") };
    assert_eq!((upstream.as_str(), *context), ("auth", id));
    assert_eq!(header(headers, ":path"), Some("/check"));
    vm.on_http_call_response(
        id,
        *token,
        Some((vec![(":status".into(), b"200".to_vec())], b"allowed".to_vec(), Vec::new())),
    )
    .unwrap();
    let s = vm.stream(id).unwrap();
    assert_eq!(header(&s.request_headers, "x-callout"), Some("200:allowed"));
    assert_eq!(s.resumed, vec![StreamType::HttpRequest]);
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    list.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
}

/// Runs stream `id`'s response-headers callback (a 200) and reads response header `name`.
fn response_header(vm: &mut Vm, id: u32, name: &str) -> Option<String> {
    vm.stream_mut(id).unwrap().response_headers = vec![(":status".into(), b"200".to_vec())].into();
    vm.on_response_headers(id, true).unwrap();
    header(&vm.stream(id).unwrap().response_headers, name).map(str::to_string)
}

/// Opens the probe's `/grpc-stream` (or `-cancel`) and checks what the embedder is handed:
/// the stream to open and the request message to send on it.
fn open_probe_stream(vm: &mut Vm, path: &str) -> (u32, u32) {
    let id = vm.create_stream(request(path, &[])).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Pause);
    let callouts = vm.take_callouts_for(id);
    let [Callout::Grpc { token, context, service, method, stream: true, .. }] = callouts.as_slice() else {
        panic!("{callouts:?}")
    };
    assert_eq!(
        (*context, service.as_str(), method.as_str()),
        (id, "envoy.service.discovery.v3.AggregatedDiscoveryService", "StreamAggregatedResources")
    );
    let ops = vm.take_grpc_ops();
    let [(t, GrpcOp::Send { message, end_stream: false })] = ops.as_slice() else { panic!("{ops:?}") };
    assert_eq!(t, token);
    assert!(message.windows(10).any(|w| w == b"grpc-probe"), "the request names the node");
    (id, *token)
}

const CLUSTERS: &[u8] = b"\x12type.googleapis.com/envoy.config.cluster.v3.Cluster";

#[test]
fn grpc_streams_deliver_metadata_messages_and_close_as_they_come() {
    let h = host();
    let mut vm = start(&h, "a");
    let (id, token) = open_probe_stream(&mut vm, "/grpc-stream");
    vm.on_grpc_initial_metadata(token, pairs(&[(":status", "200"), ("content-type", "application/grpc")])).unwrap();
    vm.on_grpc_message(token, CLUSTERS.to_vec()).unwrap();
    // The probe half-closes after the first message.
    assert_eq!(vm.take_grpc_ops(), vec![(token, GrpcOp::Close)]);
    assert!(vm.grpc_wanted(token), "still open until the server closes");
    vm.on_grpc_trailing_metadata(token, pairs(&[("grpc-status", "0")])).unwrap();
    vm.on_grpc_close(token, 0, String::new()).unwrap();
    assert!(!vm.grpc_wanted(token), "closed at both ends");
    // Nothing is delivered after the close.
    vm.on_grpc_message(token, b"late".to_vec()).unwrap();
    assert_eq!(vm.stream(id).unwrap().resumed, vec![StreamType::HttpRequest]);
    let log = response_header(&mut vm, id, "x-grpc-stream");
    assert_eq!(log.as_deref(), Some("initial:application/grpc,message:true,trailing:0,close:0"));
}

#[test]
fn a_cancelled_grpc_stream_gets_nothing_more_and_refuses_sends() {
    let h = host();
    let mut vm = start(&h, "a");
    let (id, token) = open_probe_stream(&mut vm, "/grpc-stream-cancel");
    vm.on_grpc_initial_metadata(token, pairs(&[("content-type", "application/grpc")])).unwrap();
    vm.on_grpc_message(token, CLUSTERS.to_vec()).unwrap();
    assert!(!vm.grpc_wanted(token), "cancelled");
    assert!(vm.take_grpc_ops().is_empty(), "a send after the cancel goes nowhere");
    vm.on_grpc_close(token, 0, String::new()).unwrap();
    let log = response_header(&mut vm, id, "x-grpc-stream");
    assert_eq!(log.as_deref(), Some("initial:application/grpc,message:true,cancelled,send-after:Err(NotFound)"));
    // A stream context that ends takes its open streams with it.
    let (id, token) = open_probe_stream(&mut vm, "/grpc-stream");
    vm.finish_stream(id).unwrap();
    assert!(!vm.grpc_wanted(token));
}

#[test]
fn a_unary_grpc_call_ends_with_its_message_or_its_failure() {
    let h = host();
    let mut vm = start(&h, "a");
    for (answer, expect) in
        [(Ok(b"pong".to_vec()), ("0", "4 bytes")), (Err((14, "no upstream")), ("14", "no upstream"))]
    {
        let id = vm.create_stream(request("/grpc", &[])).unwrap();
        assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Pause);
        let callouts = vm.take_callouts_for(id);
        let [Callout::Grpc { token, stream: false, .. }] = callouts.as_slice() else { panic!("{callouts:?}") };
        match answer {
            Ok(m) => vm.on_grpc_message(*token, m).unwrap(),
            Err((code, msg)) => vm.on_grpc_close(*token, code, msg.into()).unwrap(),
        }
        assert!(!vm.grpc_wanted(*token), "a call is over with its answer");
        assert_eq!(vm.stream(id).unwrap().resumed, vec![StreamType::HttpRequest]);
        let status = response_header(&mut vm, id, "x-grpc-status");
        let message = header(&vm.stream(id).unwrap().response_headers, "x-grpc-message").map(str::to_string);
        assert_eq!((status.as_deref(), message.as_deref()), (Some(expect.0), Some(expect.1)));
        vm.finish_stream(id).unwrap();
    }
}

#[test]
fn bodies_can_be_read_and_rewritten() {
    let h = host();
    let mut vm = start(&h, "a");
    let mut s = request("/upload", &[]);
    s.request_body = b"hello body".to_vec();
    let id = vm.create_stream(s).unwrap();
    vm.on_request_headers(id, false).unwrap();
    assert_eq!(vm.on_request_body(id, true).unwrap(), Action::Continue);
    assert_eq!(vm.stream(id).unwrap().request_body, b"HELLO BODY");
}

#[test]
fn shared_data_is_shared_between_vms_with_the_same_vm_id_only() {
    let h = host();
    let mut writer = start(&h, "group-1");
    let id = writer.create_stream(request("/shared-set", &[])).unwrap();
    writer.on_request_headers(id, true).unwrap();
    for (vm_id, want) in [("group-1", "probe-value"), ("group-2", "none")] {
        let mut reader = start(&h, vm_id);
        let id = reader.create_stream(request("/shared-get", &[])).unwrap();
        reader.on_request_headers(id, true).unwrap();
        assert_eq!(header(&reader.stream(id).unwrap().request_headers, "x-shared"), Some(want), "vm_id {vm_id}");
    }
    // One module, compiled once, for all four VMs.
    assert_eq!(h.compiled_modules(), 1);
}

#[test]
fn shared_add_counts_across_vms_and_mixes_with_cas() {
    let h = host();
    let run = |vm: &mut Vm, path: &str| {
        let id = vm.create_stream(request(path, &[])).unwrap();
        vm.on_request_headers(id, true).unwrap();
        header(&vm.stream(id).unwrap().request_headers, "x-shared").map(str::to_string)
    };
    let (mut a, mut b) = (start(&h, "counting"), start(&h, "counting"));
    assert_eq!(run(&mut a, "/shared-add").as_deref(), Some("5"));
    assert_eq!(run(&mut b, "/shared-add").as_deref(), Some("10"));
    // The same value through proxy_get_shared_data, with a CAS that moved on each add.
    assert_eq!(run(&mut a, "/shared-count").as_deref(), Some("10 cas:2"));
    let mut other = start(&h, "elsewhere");
    assert_eq!(run(&mut other, "/shared-add").as_deref(), Some("5"), "another vm_id has its own space");
    // An embedder's function of the same name replaces the built-in one (how tests play a host
    // without Trellis's functions).
    h.register_foreign_function(
        "trellis.shared_add",
        Arc::new(|_: &[u8]| Err(trellis_wasm_host::abi::Status::NotFound)),
    );
    let mut c = start(&h, "counting");
    assert_eq!(run(&mut c, "/shared-add").as_deref(), Some("unsupported"));
}

#[test]
fn a_bad_configuration_is_refused_with_the_filters_reason() {
    let h = host();
    let m = h.load(probe(), None).unwrap();
    let err = Vm::start(&h, m, plugin(r#"{"header": 1}"#, "a"), Limits::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, VmError::Refused { .. }) && text.contains("proxy_on_configure returned false"), "{text}");
    assert!(text.contains("bad configuration"), "the filter's own log line explains it: {text}");
}

#[test]
fn a_guest_panic_is_contained_and_poisons_only_its_vm() {
    let h = host();
    let mut vm = start(&h, "a");
    let id = vm.create_stream(request("/panic", &[])).unwrap();
    let err = vm.on_request_headers(id, true).unwrap_err();
    assert!(matches!(err, VmError::Trap { callback: "proxy_on_request_headers", .. }), "{err}");
    assert!(vm.poisoned());
    assert!(matches!(vm.create_stream(Stream::default()), Err(VmError::Poisoned { .. })));
    // A fresh VM from the same module works.
    let mut fresh = start(&h, "a");
    let id = fresh.create_stream(request("/ok", &[])).unwrap();
    assert_eq!(fresh.on_request_headers(id, true).unwrap(), Action::Continue);
}

#[test]
fn an_endless_loop_is_stopped_at_the_cpu_deadline() {
    let h = host();
    let m = h.load(probe(), None).unwrap();
    let limits = Limits { deadline: Duration::from_millis(50), ..Limits::default() };
    let mut vm = Vm::start(&h, m, plugin(CONFIG, "a"), limits).unwrap();
    let id = vm.create_stream(request("/loop", &[])).unwrap();
    let t = Instant::now();
    let err = vm.on_request_headers(id, true).unwrap_err();
    assert!(matches!(err, VmError::Timeout { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "stopped only after {:?}", t.elapsed());
}

/// A minimal proxy-wasm module in WAT whose request-headers callback runs `body`.
fn wat_module(body: &str) -> Vec<u8> {
    wat_module_with("", "", body)
}

/// [`wat_module`] with `imports` (before any definition) and `data` segments.
fn wat_module_with(imports: &str, data: &str, body: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
  {imports}
  (memory (export "memory") 1)
  {data}
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $n))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body}))"#
    );
    wat::parse_str(wat).unwrap()
}

/// A module that says its interest (`trellis.body_interest`, four bytes: request body,
/// response body, stream end, response headers) from its request-headers callback, and whose
/// callbacks named in `traps` trap (so a call to one fails).
fn interest_module(interest: [u8; 4], traps: &[&str]) -> Vec<u8> {
    let imports =
        r#"(import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))"#;
    let [q, r, e, h] = interest;
    let trap = |name: &str| if traps.contains(&name) { "unreachable" } else { "" };
    let data = format!(
        r#"(data (i32.const 16) "trellis.body_interest\{q:02x}\{r:02x}\{e:02x}\{h:02x}")
  (func (export "proxy_on_log") (param i32) {})
  (func (export "proxy_on_done") (param i32) (result i32) {} (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) {} (i32.const 0))
  (func (export "proxy_on_delete") (param i32))"#,
        trap("log"),
        trap("done"),
        trap("response")
    );
    let body = "(drop (call $ff (i32.const 16) (i32.const 21) (i32.const 37) (i32.const 4) (i32.const 64) (i32.const 68))) (i32.const 0)";
    wat_module_with(imports, &data, body)
}

#[test]
fn a_module_that_needs_no_stream_end_hears_only_on_delete() {
    // Third byte: 0 = neither on_log nor on_done, 1 = both, 2 = on_log only.
    let h = host();
    let cases = [
        (0u8, &["log", "done"][..], true),
        (1, &["log"][..], false),
        (1, &["done"][..], false),
        (2, &["done"][..], true),
        (2, &["log"][..], false),
    ];
    for (end, traps, finishes) in cases {
        let m = h.load(&interest_module([0, 0, end, 1], traps), None).unwrap();
        let mut vm = Vm::start(&h, m, plugin("", "a"), Limits::default()).unwrap();
        let id = vm.create_stream(Stream::default()).unwrap();
        vm.on_request_headers(id, true).unwrap();
        assert_eq!(vm.finish_stream(id).is_ok(), finishes, "stream-end interest {end}, trapping {traps:?}");
    }
}

#[test]
fn a_module_that_needs_no_response_headers_is_not_called_for_them() {
    let h = host();
    for (interest, called) in [(0u8, false), (1, true)] {
        let m = h.load(&interest_module([0, 0, 1, interest], &["response"]), None).unwrap();
        let mut vm = Vm::start(&h, m, plugin("", "a"), Limits::default()).unwrap();
        let id = vm.create_stream(Stream::default()).unwrap();
        vm.on_request_headers(id, true).unwrap();
        assert_eq!(vm.handles_response_headers(), called);
        assert_eq!(vm.on_response_headers(id, false).is_err(), called, "response-headers interest {interest}");
    }
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let h = host();
    // Tries to grow by 1 GiB (16,384 pages).
    let m = h.load(&wat_module("(drop (memory.grow (i32.const 16384))) (i32.const 0)"), None).unwrap();
    let limits = Limits { memory: 16 << 20, ..Limits::default() };
    let mut vm = Vm::start(&h, m, plugin("", "a"), limits).unwrap();
    let id = vm.create_stream(Stream::default()).unwrap();
    let err = vm.on_request_headers(id, true).unwrap_err();
    assert!(matches!(err, VmError::Trap { .. }), "{err}");
    assert!(vm.memory_bytes() <= 16 << 20);
}

#[test]
fn bad_pointers_are_refused_not_followed() {
    let h = host();
    // proxy_log with a pointer far outside memory: the host answers BadArgument (2).
    let body = r#"(if (i32.ne (call $log (i32.const 2) (i32.const 0x7fff0000) (i32.const 100)) (i32.const 2)) (then unreachable)) (i32.const 0)"#;
    let wat = format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body}))"#
    );
    let m = h.load(&wat::parse_str(wat).unwrap(), None).unwrap();
    let mut vm = Vm::start(&h, m, plugin("", "a"), Limits::default()).unwrap();
    let id = vm.create_stream(Stream::default()).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Continue);
}

#[test]
fn modules_are_verified_and_compiled_once() {
    let h = host();
    let bytes = probe();
    let sha = trellis_wasm_host::sha256_hex(bytes);
    let a = h.load(bytes, Some(&sha)).unwrap();
    let b = h.load(bytes, Some(&sha.to_uppercase())).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "the second load compiled again");
    let wrong = "0".repeat(64);
    assert!(matches!(h.load(bytes, Some(&wrong)), Err(LoadError::HashMismatch { .. })));
    assert!(matches!(h.load(b"\0asm but not really", None), Err(LoadError::Invalid(_))));
    // Valid wasm, but not a proxy-wasm module.
    let m = h.load(&wat::parse_str("(module (memory (export \"memory\") 1))").unwrap(), None).unwrap();
    let err = Vm::start(&h, m, plugin("", "a"), Limits::default()).unwrap_err().to_string();
    assert!(err.contains("proxy_on_memory_allocate"), "{err}");
}

#[test]
fn header_maps_are_there_only_while_their_phase_runs_as_in_envoy() {
    // Request headers (map 0) can be read in on_request_headers; in on_response_headers they
    // are gone (BadArgument, 2) and the response's (map 2) are there. Anything else traps.
    let h = host();
    let check = |map: i32, want: i32| {
        format!(
            "(if (i32.ne (call $pairs (i32.const {map}) (i32.const 64) (i32.const 68)) (i32.const {want})) (then unreachable))"
        )
    };
    let wat = format!(
        r#"(module
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $n))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {} (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) {} {} (i32.const 0)))"#,
        check(0, 0),
        check(0, 2),
        check(2, 0),
    );
    let m = h.load(&wat::parse_str(wat).unwrap(), None).unwrap();
    let mut vm = Vm::start(&h, m, plugin("", "a"), Limits::default()).unwrap();
    let stream = Stream { request_headers: vec![(":path".into(), b"/".to_vec())].into(), ..Default::default() };
    let id = vm.create_stream(stream).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Continue);
    vm.stream_mut(id).unwrap().response_headers = vec![(":status".into(), b"200".to_vec())].into();
    assert_eq!(vm.on_response_headers(id, true).unwrap(), Action::Continue);
}

#[test]
fn a_trap_in_any_callback_fails_that_callback_and_poisons_the_vm() {
    // A module whose every stream callback traps: each is reported, none crashes the host,
    // and the VM refuses further work until replaced.
    let h = host();
    let trap = "unreachable";
    let wat = format!(
        r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {trap})
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) {trap})
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) {trap})
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) {trap})
  (func (export "proxy_on_log") (param i32) {trap})
  (func (export "proxy_on_tick") (param i32) {trap}))"#
    );
    let m = h.load(&wat::parse_str(&wat).unwrap(), None).unwrap();
    type Call = fn(&mut Vm, u32) -> Result<(), VmError>;
    let calls: [(&str, Call); 6] = [
        ("proxy_on_request_headers", |vm, id| vm.on_request_headers(id, true).map(|_| ())),
        ("proxy_on_request_body", |vm, id| vm.on_request_body(id, true).map(|_| ())),
        ("proxy_on_response_headers", |vm, id| vm.on_response_headers(id, true).map(|_| ())),
        ("proxy_on_response_body", |vm, id| vm.on_response_body(id, true).map(|_| ())),
        ("proxy_on_log", |vm, id| vm.finish_stream(id)),
        ("proxy_on_tick", |vm, _| vm.on_tick()),
    ];
    for (name, call) in calls {
        let mut vm = Vm::start(&h, m.clone(), plugin("", "a"), Limits::default()).unwrap();
        let id = vm.create_stream(Stream::default()).unwrap();
        let err = call(&mut vm, id).unwrap_err();
        assert!(matches!(&err, VmError::Trap { callback, .. } if *callback == name), "{name}: {err}");
        assert!(vm.poisoned(), "{name}");
        assert!(matches!(vm.on_request_headers(id, true), Err(VmError::Poisoned { .. })), "{name}");
    }
}

#[test]
fn derived_and_host_properties_are_found_and_unknown_ones_are_not() {
    // get_property on a path (as NUL-separated segments at offset 0) must answer `want`.
    let h = host();
    h.set_property("node.id", b"sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".to_vec());
    let paths: [(&[u8], i32); 5] = [
        (b"request\0headers\0x-a", 0),
        (b"request\0query", 0),
        (b"node\0id", 0),
        (b"request\0headers\0x-missing", 1),
        (b"no\0such", 1),
    ];
    let mut data = String::new();
    let mut checks = String::new();
    let mut at = 0;
    for (p, want) in paths {
        let escaped: String = p.iter().map(|b| format!("\\{b:02x}")).collect();
        data.push_str(&format!("(data (i32.const {at}) \"{escaped}\")"));
        checks.push_str(&format!(
            "(if (i32.ne (call $prop (i32.const {at}) (i32.const {}) (i32.const 512) (i32.const 516)) (i32.const {want})) (then unreachable))",
            p.len()
        ));
        at += 64;
    }
    let import = r#"(import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))"#;
    let m = h.load(&wat_module_with(import, &data, &format!("{checks} (i32.const 0)")), None).unwrap();
    let mut vm = Vm::start(&h, m, plugin("", "a"), Limits::default()).unwrap();
    let stream = Stream {
        request_headers: vec![(":path".into(), b"/p?q=1".to_vec()), ("x-a".into(), b"1".to_vec())].into(),
        ..Default::default()
    };
    let id = vm.create_stream(stream).unwrap();
    assert_eq!(vm.on_request_headers(id, true).unwrap(), Action::Continue);
}
