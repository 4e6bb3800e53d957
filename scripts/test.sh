#!/usr/bin/env bash
# Set up (see setup.sh), then run every check and the whole test suite:
# ruff, mypy --strict, the import-layer contract, and pytest against a real
# kube-apiserver and the real kernel. Exits non-zero on any failure, including
# a pytest run that collected no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n== %s\n' "$*" >&2; }
step "ruff";          ruff check . && ruff format --check .
step "mypy --strict"; mypy
step "import layers"; lint-imports
step "pytest"
set +e
pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
