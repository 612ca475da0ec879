#!/usr/bin/env bash
# Sets up everything the test suite needs (a venv with the test extras, Debian's mosquitto when
# missing) and runs the checks: generated-table drift, ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (Debian package) for the integration tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  # The package starts a system broker on 1883; the tests start their own on free ports.
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing postgresql (Debian package) for the journal's cluster tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  # The package starts a system cluster on 5432; the tests start their own on free ports.
fi

if [ ! -x /usr/sbin/rabbitmq-server ]; then
  echo "installing rabbitmq-server (Debian package) for the exact-topic-retain broker tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
  # The package starts a system node on 5672; the tests start a node of their own on free ports.
fi

if [ ! -x /usr/sbin/ejabberdctl ]; then
  echo "installing ejabberd (Debian package) for the broker-grants tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ejabberd >/dev/null
  # The package starts a system server; the tests run a node of their own on free ports.
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "installing nodejs and npm (Debian packages) for the aedes broker tests" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
# aedes (the broker of node-red-contrib-aedes) goes into the ignored .cache/, never system-wide.
if [ ! -f .cache/aedes/node_modules/aedes/package.json ]; then
  npm install --silent --no-audit --no-fund --prefix=.cache/aedes aedes@1 >/dev/null
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver (Debian packages) for the web console's browser test" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# umqtt.simple (micropython-lib, MIT) from PyPI, unpacked into the ignored .cache/: the MicroPython
# example is run with its own code (pip cannot install this sdist: it has no setup.py).
if [ ! -f .cache/umqtt/umqtt/simple.py ]; then
  python3 tests/support/fetch_umqtt.py .cache/umqtt
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/python -m tools.tablegen --check
.venv/bin/ruff check bridge tests bench tools custom_components
.venv/bin/ruff format --check bridge tests bench tools custom_components
.venv/bin/mypy
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
