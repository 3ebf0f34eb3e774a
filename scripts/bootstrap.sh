#!/usr/bin/env bash
# Create .venv and install the locked dependencies plus llmrepro (editable). Idempotent and quick when done.
#   scripts/bootstrap.sh [LOCK]        LOCK defaults to requirements/cpu.lock
set -euo pipefail
cd "$(dirname "$0")/.."
lock="${1:-requirements/cpu.lock}"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.llmrepro-lock-$(sha256sum "$lock" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --require-hashes -r "$lock"
  rm -f .venv/.llmrepro-lock-*
  touch "$stamp"
fi
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
