#!/usr/bin/env bash
# Set everything up, then run the whole test suite (needs redis-server on PATH; the tests start
# their own private instance on a free port and never touch yours).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
