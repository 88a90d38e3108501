#!/usr/bin/env bash
# Refresh requirements/lock.txt (`make lock`): resolve the newest versions that pyproject.toml allows in a
# fresh virtual environment, then freeze every installed distribution. `make setup` (and so CI) installs
# exactly these versions; `make test-latest` runs the tests on whatever is newest today.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"  # the CPU build on CPU machines; a plain `torch` would pull CUDA wheels
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip setuptools
"$py" -m pip install --quiet "$TORCH"
"$py" -m pip install --quiet ".[all,dev]"
{
  echo "# Locked versions of every dependency (pip freeze of a fresh install of .[all,dev])."
  echo "# Used as pip constraints by \`make setup\` and so by CI. Refresh with \`make lock\` (scripts/lock.sh)."
  echo "# Made with $("$py" --version) on $(uname -m), $(date -u +%Y-%m-%d)."
  # torch: the local version label (+cpu) is dropped so the pin also matches the registry's CPU wheel
  "$py" -m pip freeze --all --exclude-editable | grep -v -i '^clearsight[ =@]' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) pins)"
