#!/usr/bin/env bash
# Set up a fresh Debian machine for staticegress: system packages, the Python
# environment in .venv, and the control-plane binaries (built once into
# ~/.cache/staticegress, reused afterwards). Safe to run again: it only does
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------
# nft/libnftables for the dataplane, iptables for the lab's CNI masquerade,
# iproute2 for namespaces, tcpdump/conntrack/iperf3 for tests and debugging.
PKGS=(nftables libnftables1 iptables iproute2 tcpdump conntrack iperf3 curl iputils-ping openssl ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { say "need root (or sudo) to install: ${missing[*]}"; exit 1; }
    SUDO=sudo
  fi
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# --- Python ---------------------------------------------------------------
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  say "Python >= 3.11 is required ($("$PY" --version 2>&1) found); set PYTHON=..."; exit 1; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.staticegress-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing the Python package and its dev tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
else
  say "Python environment up to date"
fi

# --- control-plane binaries -------------------------------------------------
# Honours KUBEBUILDER_ASSETS and TEST_ASSET_*; otherwise builds from the pinned
# Go modules (needs Go >= 1.26; a few minutes the first time, instant after).
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && ! command -v go >/dev/null; then
  say "no Go toolchain and no KUBEBUILDER_ASSETS: install Go >= 1.26 or point KUBEBUILDER_ASSETS at prebuilt binaries"
fi
.venv/bin/staticegress controlplane binaries >/dev/null
say "ready"
