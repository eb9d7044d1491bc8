//! Every example under examples/ parses, validates and analyzes clean; every file under
//! control/model/tests/broken/ fails with the field path its README promises.

use std::path::{Path, PathBuf};

use trellis_model::analyze::{Analyzed, Severity, analyze};
use trellis_model::{ParsedDocument, parse_documents, validate_resource};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().unwrap() != "broken" {
                yaml_files(&path, out);
            }
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
}

fn parse_file(path: &Path) -> Vec<ParsedDocument> {
    let text = std::fs::read_to_string(path).unwrap();
    let (docs, errors) = parse_documents(&text, &path.display().to_string());
    assert!(errors.is_empty(), "{errors:?}");
    docs
}

#[test]
fn every_example_parses_validates_and_analyzes_without_errors() {
    let mut files = Vec::new();
    yaml_files(&examples_dir(), &mut files);
    assert!(files.len() >= 10, "expected the example set, found {files:?}");
    let mut analyzed = Vec::new();
    for f in &files {
        for doc in parse_file(f) {
            let (key, spec) =
                validate_resource(&doc.resource, "default").unwrap_or_else(|e| panic!("{}: {e}", doc.origin()));
            analyzed.push(Analyzed { key, spec, origin: Some(doc.origin()) });
        }
    }
    for kind in [
        "VirtualService",
        "DestinationRule",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "ServiceEntry",
        "WorkloadEntry",
        "Gateway",
        "Sidecar",
        "Telemetry",
        "WasmPlugin",
        "MeshCluster",
    ] {
        assert!(analyzed.iter().any(|a| a.key.kind.name() == kind), "no {kind} example");
    }
    let diags = analyze(&analyzed);
    let errors: Vec<String> = diags.iter().filter(|d| d.severity == Severity::Error).map(|d| d.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

fn broken_errors(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let (docs, parse_errors) = parse_documents(&text, name);
    let mut out: Vec<String> = parse_errors.iter().map(|e| e.to_string()).collect();
    for d in docs {
        if let Err(e) = validate_resource(&d.resource, "default") {
            out.extend(e.errors.iter().map(|fe| format!("{}: {fe}", d.origin())));
        }
    }
    out
}

#[test]
fn broken_examples_fail_with_their_field_paths() {
    let weights = broken_errors("bad-weights.yaml");
    assert!(
        weights.iter().any(|e| e.contains("spec.http[0].route: weights") && e.contains("sum to 95")),
        "{weights:?}"
    );
    let unknown = broken_errors("unknown-field.yaml");
    assert!(unknown.iter().any(|e| e.contains("spec.trafficPolicy.conectionPool: unknown field")), "{unknown:?}");
    let wasm = broken_errors("wasm-urls.yaml");
    assert_eq!(wasm.len(), 3, "{wasm:?}");
    assert!(
        wasm[0].contains("spec.url: oci:// modules are not fetched") && wasm[0].contains("trellis wasm push"),
        "{wasm:?}"
    );
    assert!(wasm[1].contains("spec.url: trellis:// names an uploaded module by its sha256"), "{wasm:?}");
    assert!(wasm[2].contains("spec.sha256: differs from the sha256 in the URL"), "{wasm:?}");
    let half = broken_errors("half-bad.yaml");
    assert_eq!(half.len(), 1, "{half:?}");
    assert!(half[0].starts_with("half-bad.yaml: document 1") && half[0].contains("spec.http[0].timeout"), "{half:?}");
}
