#!/usr/bin/env bash
# The test command (README): set up everything, then run the whole suite as root.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k rewrite`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest "$@"
