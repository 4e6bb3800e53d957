#!/usr/bin/env bash
# Set up (see setup.sh), then run the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "the demo's lab creates network namespaces: run it as root (sudo $0)" >&2
  exit 1
fi
./scripts/setup.sh
exec .venv/bin/staticegress demo "$@"
