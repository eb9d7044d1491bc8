#!/usr/bin/env bash
# Trellis's main job: the control plane on the embedded store, with examples/ applied. It
# prints where its API listens and how to point the CLI at it, then serves until Ctrl-C.
# Extra arguments go to trellis-control (e.g. --api-addr 127.0.0.1:16080, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p trellis-control -p trellis
bin="$PWD/target/release"
printf '\nThe CLI is %s/trellis — put it on your PATH:\n  export PATH=%s:$PATH\n' "$bin" "$bin" >&2
exec "$bin/trellis-control" --apply examples/ "$@"
