"""The shipped systemd units: hardening directives present, consistent with the code, and accepted
by `systemd-analyze verify` when the machine has it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.config import LimitsConfig, load_config
from bridge.errors import EX_CONFIG
from bridge.runtime.process import MMAP_THRESHOLD, pin_mmap_threshold

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "openai-mqtt-bridge.service"
TEMPLATE = ROOT / "systemd" / "openai-mqtt-bridge@.service"
EXEC = "/opt/openai-mqtt-bridge/.venv/bin/openai-mqtt-bridge"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd allows repeated keys)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: assignment outside a section: {line!r}"
        key, eq, value = line.partition("=")
        assert eq, f"{path.name}: not an assignment: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"{key}= missing from [{section}]"
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


HARDENING = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "5",
    "RestartPreventExitStatus": str(EX_CONFIG),
    "DynamicUser": "yes",
    "ConfigurationDirectory": "openai-mqtt-bridge",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "UMask": "0077",
    "MemoryMax": "256M",
    "TasksMax": "64",
}


@pytest.fixture(params=[UNIT, TEMPLATE], ids=["plain", "template"])
def unit_path(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


def test_state_directory_holds_the_journal(unit_path: Path) -> None:
    unit = parse_unit(unit_path)
    expected = "openai-mqtt-bridge/%i" if "@" in unit_path.name else "openai-mqtt-bridge"
    assert one(unit, "StateDirectory") == expected
    assert one(unit, "StateDirectoryMode") == "0700"


def test_hardening_directives(unit_path: Path) -> None:
    unit = parse_unit(unit_path)
    for key, expected in HARDENING.items():
        assert one(unit, key) == expected, f"{unit_path.name}: {key}="
    assert "@system-service" in unit["Service"]["SystemCallFilter"]
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_stop_timeout_covers_the_shutdown_grace(unit_path: Path) -> None:
    unit = parse_unit(unit_path)
    stop = float(one(unit, "TimeoutStopSec"))
    assert stop >= LimitsConfig().shutdown_grace + 10


def test_credentials_have_fallbacks(unit_path: Path) -> None:
    """Each LoadCredential= has a SetCredential= of the same id, so a missing file is not fatal."""
    service = parse_unit(unit_path)["Service"]
    loaded = dict(v.split(":", 1) for v in service["LoadCredential"])
    fallbacks = dict(v.split(":", 1) for v in service["SetCredential"])
    assert set(loaded) == {"openai_api_key", "mqtt_password"}
    assert set(fallbacks) == set(loaded)
    assert all(path.startswith("/etc/openai-mqtt-bridge/") for path in loaded.values())
    # systemd 252 rejects an empty SetCredential= value; a newline is the "empty" we use.
    assert set(fallbacks.values()) == {r"\n"}


def test_fallback_credentials_mean_no_secret(tmp_path: Path) -> None:
    """The bridge reads the credentials the units define; the newline fallback means none."""
    (tmp_path / "openai_api_key").write_text("\n")
    (tmp_path / "mqtt_password").write_text("\n")
    for name in ("openai_api_key", "mqtt_password"):
        os.chmod(tmp_path / name, 0o400)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "OPENAI_API_KEY": "sk-from-env"}
    warnings: list[str] = []
    config = load_config(None, environ=env, warnings=warnings)
    assert config.service.api_key.get_secret_value() == ""
    assert config.mqtt.password.get_secret_value() == ""
    assert warnings == []

    (tmp_path / "openai_api_key").chmod(0o600)
    (tmp_path / "openai_api_key").write_text("sk-real-key\n")
    config = load_config(None, environ=env)
    assert config.service.api_key.get_secret_value() == "sk-real-key"


def test_exec_start_and_instances() -> None:
    plain = parse_unit(UNIT)
    template = parse_unit(TEMPLATE)
    assert one(plain, "ExecStart") == f"{EXEC} --config /etc/openai-mqtt-bridge/bridge.toml"
    assert one(template, "ExecStart") == f"{EXEC} --config /etc/openai-mqtt-bridge/%i.toml"
    assert "OMB_MQTT__INSTANCE=%i" in template["Service"]["Environment"]
    assert all("%i" in v for v in template["Service"]["LoadCredential"])


def test_instance_names_from_the_environment() -> None:
    """What OMB_MQTT__INSTANCE=%i gives the bridge: a name with a letter works, a number fails."""
    config = load_config(None, environ={"OMB_MQTT__INSTANCE": "kitchen"})
    assert config.mqtt.instance_name == "kitchen"
    assert config.mqtt.effective_client_id == "openai-mqtt-bridge-kitchen"


# --- systemd-analyze verify -------------------------------------------------------------------

_ANALYZE = shutil.which("systemd-analyze")
_HOST_UNITS = Path("/usr/lib/systemd/system")
# The one complaint allowed when the bridge is not installed at /opt on this machine.
_MISSING_EXEC = re.compile(
    r"^openai-mqtt-bridge(@kitchen)?\.service: Command "
    + re.escape(EXEC)
    + r" is not executable: No such file or directory$"
)


def _verify(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_ANALYZE or "systemd-analyze", "verify", "--man=no", "--generators=no", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


@pytest.mark.skipif(_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Both units, the template as an instance, as the machine's systemd reads them."""
    work = tmp_path / "units"
    work.mkdir()
    shutil.copy(UNIT, work / UNIT.name)
    shutil.copy(TEMPLATE, work / TEMPLATE.name)
    shutil.copy(TEMPLATE, work / "openai-mqtt-bridge@kitchen.service")
    result = _verify(["./openai-mqtt-bridge.service", "./openai-mqtt-bridge@kitchen.service"], work)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if not _MISSING_EXEC.match(line)]
    assert not unexpected, "\n".join(lines)
    assert result.returncode == 0 or lines, result


@pytest.mark.skipif(
    _ANALYZE is None or not (_HOST_UNITS / "sysinit.target").exists(),
    reason="systemd-analyze or the host's unit directory is missing",
)
def test_systemd_analyze_verify_in_a_root(tmp_path: Path) -> None:
    """In a scratch root where ExecStart exists, verification must be completely clean."""
    root = tmp_path / "root"
    shutil.copytree(_HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    exe = root / EXEC.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    shutil.copy(UNIT, target / UNIT.name)
    shutil.copy(TEMPLATE, target / TEMPLATE.name)
    result = _verify(
        [f"--root={root}", "openai-mqtt-bridge.service", "openai-mqtt-bridge@kitchen.service"],
        tmp_path,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_units_pin_the_mmap_threshold_the_bridge_would_pin_itself() -> None:
    for unit in (parse_unit(UNIT), parse_unit(TEMPLATE)):
        assert f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}" in unit["Service"]["Environment"]
    # Set from the environment, glibc applies it from the first allocation; the bridge then
    # leaves it as the operator's choice.
    assert not pin_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
