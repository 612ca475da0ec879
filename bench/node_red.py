"""The Node-RED peer: installed on demand into a cache folder, run from a per-run user directory.

`install()` puts Node-RED and the vendored node-red-openai-api (bench/nodered/) into a cache folder
named after a hash of bench/nodered/'s package files, with npm, once; `user_dir()` lays out the
flow, settings and credentials for one run; `argv()` is the command that starts it. Everything
the harness needs comes from this repository and the npm registry; nothing else is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent / "nodered"
PACKAGE_FILES = ("package.json", "inductiv-node-red-openai-api-6.34.0.tgz")
USER_FILES = ("flows.json", "flows_cred.json", "settings.js")
PREFIX = "nodered"
"""The topic prefix of the Node-RED flow (the bridge uses `openai`, the echo responder `echo`)."""
MIN_NODE_MAJOR = 18  # Node-RED 4.x


@dataclass(frozen=True, slots=True)
class Install:
    """A ready Node-RED installation."""

    node: str
    """The node executable."""
    root: Path
    """The folder holding node_modules/ with node-red and the OpenAI API node."""
    versions: dict[str, str]


class Unavailable(Exception):
    """Node-RED cannot run here; the message says why and what would fix it."""


def default_cache() -> Path:
    """The repository's own ignored .cache/ (nothing outside the repository is read)."""
    return HERE.parent.parent / ".cache"


def _digest() -> str:
    """A short hash of the package files: a new version gets a new cache folder."""
    sha = hashlib.sha256()
    for name in PACKAGE_FILES:
        sha.update((HERE / name).read_bytes())
    return sha.hexdigest()[:12]


def _node() -> str:
    """The node executable, checked to be new enough; Unavailable otherwise."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise Unavailable(
            "Node.js (node and npm) is not on PATH; install Node.js >= 18"
            " (e.g. `apt-get install -y nodejs npm`) to run the Node-RED comparison"
        )
    out = subprocess.run([node, "--version"], capture_output=True, timeout=30, check=False)
    version = out.stdout.decode().strip().lstrip("v")
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    if major < MIN_NODE_MAJOR:
        raise Unavailable(f"Node.js {version or '?'} is too old for Node-RED 4 (needs >= 18)")
    return node


def _versions(root: Path) -> dict[str, str]:
    """Versions of the packages that matter, read from the installed tree."""
    found = {}
    for name in ("node-red", "@inductiv/node-red-openai-api", "openai", "mqtt"):
        with_pkg = root / "node_modules" / name / "package.json"
        if with_pkg.exists():
            found[name] = json.loads(with_pkg.read_text())["version"]
    return found


def install(cache: Path | None = None, log: Path | None = None) -> Install:
    """A Node-RED installation in the cache, made with npm on first use; Unavailable on failure."""
    node = _node()
    root = (cache or default_cache()) / f"bench-nodered-{_digest()}"
    if not (root / ".complete").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
        for name in PACKAGE_FILES:
            shutil.copy2(HERE / name, staging / name)
        argv = ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--omit=dev"]
        print(f"  installing Node-RED into {root} (npm, about 40 s, once)", flush=True)
        try:
            done = subprocess.run(argv, cwd=staging, capture_output=True, timeout=900, check=False)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise Unavailable("npm install did not finish in 15 minutes") from exc
        if log is not None:
            log.write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = (done.stdout + done.stderr).decode(errors="replace")[-800:]
            raise Unavailable(f"npm install failed (exit {done.returncode}):\n{tail}")
        (staging / ".complete").write_text("")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return Install(node=node, root=root, versions=_versions(root))


def user_dir(install: Install, parent: Path) -> Path:
    """A fresh Node-RED user directory with the bench flow, linked to the installation."""
    target = Path(tempfile.mkdtemp(prefix="nodered-", dir=parent))
    for name in USER_FILES:
        shutil.copyfile(HERE / name, target / name)
    (target / "node_modules").symlink_to(install.root / "node_modules", target_is_directory=True)
    return target


def argv(install: Install, userdir: Path) -> list[str]:
    """The command that starts Node-RED on `userdir`."""
    red = install.root / "node_modules" / "node-red" / "red.js"
    return [
        install.node,
        str(red),
        "--userDir",
        str(userdir),
        "--settings",
        str(userdir / "settings.js"),
    ]


def env(broker_port: int, api_base: str) -> dict[str, str]:
    """The environment the flow reads: broker, service URL; the editor on any free port."""
    return {
        **os.environ,
        "BENCH_MQTT_HOST": "127.0.0.1",
        "BENCH_MQTT_PORT": str(broker_port),
        "BENCH_OPENAI_BASE": api_base,
        "BENCH_NR_HOST": "127.0.0.1",
        "BENCH_NR_PORT": "0",
        "BENCH_NR_LOG": "warn",
    }
