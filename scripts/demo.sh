#!/usr/bin/env bash
# The main job on its built-in default scenario (README): set up everything, then move a
# checkpointed service from test host A to test host B through the per-node view.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m inetsk_testbed.demo "$@"
