#!/usr/bin/env bash
# Set up (see setup.sh), then run the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/staticegress demo "$@"
