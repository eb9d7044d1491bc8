#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format check, clippy with warnings as errors,
# the binaries (end-to-end tests run them), then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --all --manifest-path filters/Cargo.toml -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The filters and the SDK: their own workspace, built for wasm32-wasip1 only.
cargo clippy --manifest-path filters/Cargo.toml --target wasm32-wasip1 --locked -- -D warnings
echo "== cargo build (binaries for the end-to-end tests)"
cargo build --workspace --bins --locked
echo "== cargo test"
# End-to-end tests start control planes, proxies and upstreams each; they run one at a time
# so a 2-core machine's load never decides a result (timing assumptions found that way were
# fixed; this keeps new ones from flaking CI).
{
  cargo test --workspace --locked --exclude trellis-e2e
  cargo test -p trellis-e2e --locked -- --test-threads=1
} 2>&1 | tee target/test-output.txt
passed=$(grep -Eo '[0-9]+ passed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target/test-output.txt | awk '{s+=$1} END {print s+0}')
echo "== ${passed} passed, ${failed} failed in $(( $(date +%s) - start )) s"
