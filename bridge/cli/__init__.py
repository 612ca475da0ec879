"""Command line: `run` (default), `check-config`, `methods`, `describe`, `call`, `realtime`,
`--version`."""

from bridge.compat.optional import skip_unused

skip_unused()  # before anything imports structlog
