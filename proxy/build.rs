//! Builds the built-in filter modules (filters/fault, retry, mirror, auth) for
//! wasm32-wasip1 and embeds them: they are present in every trellis-proxy binary (a WasmPlugin
//! can still replace them at run time). Needs the wasm32-wasip1 target
//! (`rustup target add wasm32-wasip1`; scripts/setup.sh installs it).

use std::path::PathBuf;
use std::process::Command;

const MODULES: [&str; 4] = ["fault", "retry", "mirror", "auth"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let filters = manifest_dir.join("../filters");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for watched in
        ["Cargo.toml", "Cargo.lock", "fault/src", "retry/src", "mirror/src", "auth/src", "../sdk/trellis-sdk/src"]
    {
        println!("cargo:rerun-if-changed={}", filters.join(watched).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--locked", "-q", "--target", "wasm32-wasip1", "--profile", "wasm", "--manifest-path"])
        .arg(filters.join("Cargo.toml"));
    for m in MODULES {
        cmd.args(["-p", m]);
    }
    // The outer build's settings are not the filters' (their own target dir, no host flags,
    // no clippy / wrapper driving this nested build).
    for var in [
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the built-in filters");
    if !status.success() {
        panic!(
            "building the built-in filter modules failed (is the wasm32-wasip1 target installed? \
             rustup target add wasm32-wasip1)"
        );
    }
    for m in MODULES {
        let built = filters.join(format!("target/wasm32-wasip1/wasm/{m}.wasm"));
        std::fs::copy(&built, out.join(format!("{m}.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    }
}
