#!/usr/bin/env bash
# Creates the venv on first use, installs the bridge, and runs it with the config file given as
# first argument (relative to the folder you call from), else the usual search: $OMB_CONFIG, then
# config/bridge.toml here. With no [mqtt] host set it uses a broker already answering on
# 127.0.0.1:1883, else starts an embedded trial broker. Options (./start.sh --help, --version)
# go to the bridge's command line as they are.
set -euo pipefail
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
args=()
if [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; then
  args=("$@")
elif [ $# -gt 0 ]; then
  args=(--config "$(absolute "$1")")
elif [ -n "${OMB_CONFIG:-}" ]; then
  export OMB_CONFIG="$(absolute "$OMB_CONFIG")"
fi
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/openai-mqtt-bridge ]; then
  echo "start.sh: first run: creating .venv and installing the bridge with its dependencies" \
    "(about a minute; later runs start at once)" >&2
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[trial]'
  echo "start.sh: installed; starting the bridge" >&2
fi
exec .venv/bin/openai-mqtt-bridge "${args[@]}"
