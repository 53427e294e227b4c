# Sourced by scripts/demo and scripts/test: make .venv and install the project into it.
# The install is redone only when pyproject.toml changed since the last one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "flexmesh needs Python 3.11+"'
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.flexmesh-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
