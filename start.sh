#!/usr/bin/env bash
# Creates the venv on first use, installs the bridge, and runs it with config/bridge.toml
# (or the file given as first argument). With no [mqtt] host set it starts an embedded broker.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/openai-mqtt-bridge ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[trial]'
fi
exec .venv/bin/openai-mqtt-bridge --config "${1:-config/bridge.toml}"
