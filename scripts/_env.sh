# Sourced by the scripts: make sure .venv exists with qtasks (and the given extras) installed.
# Usage: . scripts/_env.sh [extras]   e.g.  . scripts/_env.sh dev
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "qtasks needs Python 3.10 or newer; set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
spec="."
if [ -n "${1:-}" ]; then spec=".[$1]"; fi
# Quiet and fast when everything is already installed; editable so edits take effect.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
export PATH="$ROOT/.venv/bin:$PATH"
