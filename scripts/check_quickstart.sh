#!/usr/bin/env bash
# The README quickstart, run verbatim in a fresh venv: `make setup` into a new venv, then every
# other command of the quickstart block in a new folder (scripts/run_quickstart.py).
#   scripts/check_quickstart.sh [WORKDIR]      (default: a new temporary folder, removed afterwards)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
[ -n "${1:-}" ] || trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
make -C "$REPO" setup VENV="$WORK/venv" PYTHON="${PYTHON:-python3}"
echo "setup: $(( $(date +%s) - START )) s"
PATH="$WORK/venv/bin:$PATH" KIFMERGE_REGISTRY="$WORK/quickstart/registry" \
    "$WORK/venv/bin/python" "$REPO/scripts/run_quickstart.py" "$WORK/quickstart"
echo "quickstart ok in a fresh venv: $(( $(date +%s) - START )) s in all"
