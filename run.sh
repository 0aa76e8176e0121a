#!/usr/bin/env bash
# vit-spine entry point for a fresh machine.
#   ./run.sh demo        synthetic RSNA-layout data -> scan -> chunk -> train -> evaluate -> predict -> report
#   ./run.sh test        the test suite
#   ./run.sh resume ...  continue an interrupted `train` run (same arguments as `vit-spine train`)
#   ./run.sh <cmd> ...   any vit-spine subcommand (synth, scan, chunk, train, evaluate, predict, push, report, bench)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

ensure_venv() {
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp="$VENV/.vit-spine-installed" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    echo "[run.sh] setting up $VENV (first run takes a few minutes)" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # torch==2.13.0 is a local CPU wheel on our machines; an unpinned torch pulls GBs of CUDA.
    # Set VIT_SPINE_TORCH="torch" (or any spec) to choose another build.
    "$PY" -m pip install -q "${VIT_SPINE_TORCH:-torch==2.13.0}"
    "$PY" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    help|-h|--help)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
        ;;
    test)
        ensure_venv
        exec "$PY" -m pytest "$@"
        ;;
    demo)
        ensure_venv
        exec "$PY" -m vit_spine demo "$@"
        ;;
    resume)
        ensure_venv
        exec "$PY" -m vit_spine train "$@"
        ;;
    *)
        ensure_venv
        exec "$PY" -m vit_spine "$cmd" "$@"
        ;;
esac
