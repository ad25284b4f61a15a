#!/usr/bin/env bash
# Set everything up, then serve the shipped character model on http://localhost:${PORT:-8000}
# with the embedded session store (one worker). Set REDIS_URL and WEB_CONCURRENCY for more.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PORT=${PORT:-8000}
exec .venv/bin/gunicorn -c service/gunicorn.conf.py 'service:create_app()'
