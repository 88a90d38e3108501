#!/usr/bin/env bash
# Screenshots of the dashboard's pages (docs/dashboard-*.png) in headless Chromium; fails if a page is blank
# or shows an error. Installs nothing: needs Debian's `chromium` (apt-get install chromium) or $CHROMIUM.
#   scripts/screenshots.sh                 # runs a small eval job for the Evals page, writes docs/*.png
#   scripts/screenshots.sh --runs runs     # uses your result folders instead
#   scripts/screenshots.sh --out /tmp/shots
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" scripts/screenshots.py "$@"
