"""What every command shares: exit codes, finding and loading the config, saying which."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bridge.errors import EX_CONFIG, ConfigError

if TYPE_CHECKING:
    from bridge.config import BridgeConfig

EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 141


CONFIG_SEARCH = ("config/bridge.toml", "/etc/openai-mqtt-bridge/bridge.toml")
"""Where a config file is looked for when neither --config nor $OMB_CONFIG names one."""


def find_config(
    explicit: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str]:
    """The config file and why: --config, $OMB_CONFIG, then `CONFIG_SEARCH`; None: defaults."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, "--config"
    if env.get("OMB_CONFIG"):
        return env["OMB_CONFIG"], "$OMB_CONFIG"
    for candidate in CONFIG_SEARCH:
        if os.path.isfile(candidate):
            return candidate, "found"
    return None, "no file found"


def config_note(path: str | None, how: str) -> str:
    """One line saying which configuration is in force."""
    if path is None:
        return f"config: built-in defaults (no {' or '.join(CONFIG_SEARCH)})"
    return f"config: {path} ({how})" if how != "found" else f"config: {path}"


def load(path: str | None) -> tuple[BridgeConfig, list[str]]:
    """The config at `path` and its warnings; raises ConfigError (every problem, `[access]`
    patterns that match no method included)."""
    from bridge.config import load_config
    from bridge.methods.catalog import default_table
    from bridge.pipeline.access import pattern_problems

    warnings: list[str] = []
    from bridge.tools.config import check_tools

    config = check_tools(load_config(path, warnings=warnings))
    access = config.access
    problems = pattern_problems(access.allow_methods, access.deny_methods, default_table())
    if problems:
        raise ConfigError(problems)
    return config, warnings


def print_problems(exc: ConfigError, path: str | None) -> None:
    if exc.from_env:
        where = f"{path} and the environment" if path else "the environment"
    else:
        where = path or "defaults"
    print(f"invalid configuration ({where}):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def unknown_method(name: str) -> str:
    """`unknown method 'x'` with the closest method names."""
    from bridge.methods.catalog import default_table

    return default_table().unknown(name)


def load_said(path: str | None, how: str) -> tuple[BridgeConfig, list[str]] | int:
    """Say which config is used (stderr), load it: the config and its warnings, or EX_CONFIG
    after printing every problem."""
    print(config_note(path, how), file=sys.stderr)
    try:
        return load(path)
    except ConfigError as exc:
        print_problems(exc, path)
        return EX_CONFIG
