#!/usr/bin/env bash
# Set up a fresh Debian machine for staticegress: system packages, the Python
# environment in .venv, the control-plane binaries, and the real-runtime lab's
# node binaries and images (the pause image and the product image), all built
# once into ~/.cache/staticegress and reused afterwards. Safe to run again: it
# only does what is missing. STATICEGRESS_NODE_ASSETS=0 skips the node binaries
# and images (the network-namespace lab and the demo do not need them).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------
# nft/libnftables for the dataplane, iptables for the lab's CNI masquerade,
# iproute2 for namespaces, tcpdump/conntrack/iperf3 for tests and debugging.
# The real-runtime lab: runc (Debian's works here; crun refuses this cgroup v1
# hybrid layout) and the CNI plugins; the images: podman, mmdebstrap for the
# Debian base, gcc and libc6-dev for the static pause program.
PKGS=(nftables libnftables1 iptables iproute2 tcpdump conntrack iperf3 curl iputils-ping openssl ca-certificates
      runc containernetworking-plugins podman mmdebstrap gcc libc6-dev)
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

# --- the real-runtime lab's node binaries and images ---------------------------
# kubelet and kube-proxy (from the control plane's module), containerd, ctr and
# its runc shim, the pause image, and the product image, built offline from
# Debian packages and pinned wheels (about 2 minutes more the first time).
if [ "${STATICEGRESS_NODE_ASSETS:-1}" != 0 ]; then
  .venv/bin/staticegress controlplane node-binaries >/dev/null
  .venv/bin/staticegress image pause >/dev/null
  .venv/bin/staticegress image build >/dev/null
fi
say "ready"
