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
# The lab lives at fixed names on this machine: a second run at the same time
# would tear down the first's lab. Wait for it instead.
mkdir -p /run/lock
exec 9>/run/lock/staticegress-tests.lock
if ! flock -n 9; then
  echo "another test run holds /run/lock/staticegress-tests.lock: waiting for it" >&2
  flock 9
fi
set +e
pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
