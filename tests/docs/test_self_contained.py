"""The repository stands on its own: nothing in it reads a path outside it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The folder beside the clone the table was once built from, spelled so this file does not match.
OLD_FOLDER = "shared" + "/openai-openapi"
OUTSIDE_PATTERN = re.compile(r"\.\./" + "shared|" + re.escape(OLD_FOLDER))


def tracked_files() -> list[str]:
    """The files git tracks in this checkout."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, check=True, capture_output=True, timeout=60
    ).stdout
    return [name for name in out.decode("utf-8").split("\0") if name]


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="not a git checkout")
def test_no_tracked_file_names_the_old_spec_folder_outside_the_repo() -> None:
    offenders = []
    for name in tracked_files():
        if name.endswith(".md"):
            continue
        text = (REPO_ROOT / name).read_bytes().decode("utf-8", errors="replace")
        if OUTSIDE_PATTERN.search(text):
            offenders.append(name)
    assert offenders == []


def test_the_daemon_never_imports_the_yaml_parser_or_the_generator() -> None:
    code = (
        "import sys, bridge.runtime.daemon, bridge.cli.main, bridge.pipeline.dispatch,"
        " bridge.methods.catalog\n"
        "bridge.methods.catalog.default_table()\n"
        "print(sorted(m for m in sys.modules if m == 'yaml' or m.startswith("
        "('yaml.', 'tools.tablegen', 'tools.tablegen.specfacts'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_idle_daemon_loads_neither_jmespath_nor_asyncpg_nor_the_mime_table() -> None:
    """Start-up cost (issue 13): a `select`, a PostgreSQL journal or a file upload loads them."""
    code = (
        "import sys, mimetypes, bridge.runtime.daemon, bridge.cli.main,"
        " bridge.pipeline.dispatch, bridge.methods.catalog\n"
        "bridge.methods.catalog.default_table()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jmespath', 'asyncpg')),"
        " mimetypes.inited)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"


def test_vendored_specs_are_the_ones_the_source_note_names() -> None:
    note = (REPO_ROOT / "spec" / "README.md").read_text(encoding="utf-8")
    for name in ("openapi-latest.yaml", "openapi-2024-02.yaml"):
        digest = hashlib.sha256((REPO_ROOT / "spec" / name).read_bytes()).hexdigest()
        assert f"| {name} |" in note and digest in note, name


@pytest.mark.timeout(600)  # a clone, a generator run and a collection: slow on a loaded Pi
@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="not a git checkout")
def test_a_clone_alone_in_an_empty_folder_generates_and_collects(tmp_path: Path) -> None:
    """Clone the committed tree alone into an empty folder; the generator check and pytest
    collection run there with the clone's own sources (PYTHONPATH) and no sibling folders."""
    clone = tmp_path / "alone" / "repo"
    clone.parent.mkdir()
    subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(REPO_ROOT), str(clone)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert sorted(p.name for p in clone.parent.iterdir()) == ["repo"]
    env = {**os.environ, "PYTHONPATH": str(clone)}
    env.pop("PYTEST_ADDOPTS", None)
    check = subprocess.run(
        [sys.executable, "-m", "tools.tablegen", "--check"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collect.returncode == 0, collect.stdout[-4000:] + collect.stderr[-4000:]
    assert re.search(r"^\d+ tests collected", collect.stdout, re.MULTILINE), collect.stdout[-2000:]
    imported = subprocess.run(
        [sys.executable, "-c", "import bridge; print(bridge.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert Path(imported.stdout.strip()).resolve().is_relative_to(clone.resolve())
    shutil.rmtree(clone)
