#!/usr/bin/env bash
# FlashSloth's single entry point. Every command first makes sure the virtual environment at .venv/ exists and
# holds the package: torch==2.13.0 (CPU wheel) is installed first so that no CUDA build is pulled in, then the
# package in editable mode with its test extras. Set-up is skipped when nothing changed since the last one.
#
#   bash run.sh demo [DEMO ARGS...]     ask the embedded demo model about a freshly drawn scene (offline)
#   bash run.sh test [PYTEST ARGS...]   run the test suite
#   bash run.sh setup                   only set up the environment
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON="$VENV/bin/python"
STAMP="$VENV/.flashsloth-setup"

setup() {
    if [ ! -x "$PYTHON" ]; then
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$STAMP" ] || [ setup.cfg -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
        "$PYTHON" -m pip install --quiet --disable-pip-version-check torch==2.13.0
        "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
        touch "$STAMP"
    fi
}

command="${1:-help}"
shift || true
case "$command" in
    setup)
        setup
        ;;
    demo)
        setup
        exec "$VENV/bin/flashsloth" demo "$@"
        ;;
    test)
        setup
        exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
        ;;
esac
