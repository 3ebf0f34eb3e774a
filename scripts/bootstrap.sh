#!/usr/bin/env bash
# Create .venv (Python 3.11, the one minor the locks are resolved for) and install the locked dependencies plus
# llmrepro (editable). Idempotent and quick when done.
#   scripts/bootstrap.sh [LOCK]        LOCK defaults to requirements/cpu.lock
# DeepSpeed is an sdist: pip builds its pure-Python wheel in an isolated environment (setuptools from the index).
# No compiler is needed at run time: llmrepro turns DeepSpeed's g++-compiled CPU collectives off (plain gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
lock="${1:-requirements/cpu.lock}"
want=3.11

minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [ ! -x .venv/bin/python ]; then
  python=""
  for candidate in python3 "python$want"; do
    if command -v "$candidate" >/dev/null && [ "$(minor "$candidate")" = "$want" ]; then python="$candidate"; break; fi
  done
  if [ -z "$python" ]; then
    echo "bootstrap: needs Python $want (the locks are resolved for it); python3 is $(minor python3 || echo missing)" >&2
    exit 2
  fi
  "$python" -m venv .venv
elif [ "$(minor .venv/bin/python)" != "$want" ]; then
  echo "bootstrap: .venv has Python $(minor .venv/bin/python), the locks need $want: remove .venv and run again" >&2
  exit 2
fi
stamp=".venv/.llmrepro-lock-$(sha256sum "$lock" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --require-hashes -r "$lock"
  rm -f .venv/.llmrepro-lock-*
  touch "$stamp"
fi
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
