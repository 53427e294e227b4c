# Sourced by scripts/demo, scripts/test and the bench scripts: make .venv if it is missing,
# install the dependencies when pyproject.toml changed, and (re)install flexmesh itself from
# this checkout so that what runs is what is in the tree.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "flexmesh needs Python 3.11+"'
    echo "creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.flexmesh-deps"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "installing dependencies into $VENV (first run only)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >/dev/null
    "$VENV/bin/python" -m pip install -q "$ROOT[test]"
    touch "$stamp"
fi
# A plain (not editable) install: setuptools' editable finder is invisible to mypy, and the
# package-dir mapping (agent/ -> flexmesh.agent) needs a real install to be importable.
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$ROOT" \
    >/dev/null 2>&1 || "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation \
    --force-reinstall "$ROOT"
rm -rf "$ROOT/build" "$ROOT"/*.egg-info
export PATH="$VENV/bin:$PATH"
