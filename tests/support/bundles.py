"""Agent bundles built once per test session with deploy/build-agent-bundle.sh, in three releases.

``good`` is this checkout as release 0.1.0; ``next`` the same code as version 0.1.1 (an upgrade);
``broken`` version 0.1.2 whose agent runtime cannot be imported (a release that must never go live).
The dependency wheels are fetched and built once, for ``good``; the others reuse them (--reuse-wheels).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "deploy" / "build-agent-bundle.sh"
RELEASES = {"good": "0.1.0", "next": "0.1.1", "broken": "0.1.2"}
_built: dict[str, Path] = {}


def _source_copy(directory: Path, version: str, *, broken: bool) -> Path:
    """A copy of the checkout with another version in pyproject.toml (and, if asked, a broken agent runtime)."""
    source = directory / f"src-{version}"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "var", "build", "*.egg-info", "__pycache__", ".*_cache"),
    )
    pyproject = source / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    edited = re.sub(r'(?m)^version = "[^"]+"$', f'version = "{version}"', text, count=1)
    assert edited != text or f'version = "{version}"' in text
    pyproject.write_text(edited, encoding="utf-8")
    if broken:
        runtime = source / "agents" / "runtime" / "agent.py"
        runtime.write_text(runtime.read_text(encoding="utf-8") + '\nraise ImportError("a broken release")\n')
    return source


def agent_bundle(factory: pytest.TempPathFactory, variant: str) -> Path:
    """Return the unpacked bundle directory of one variant, building it on first use in this session."""
    if variant in _built:
        return _built[variant]
    out = factory.mktemp(f"bundle-{variant}")
    release = RELEASES[variant]
    args = ["sh", str(BUILD), "--out", str(out), "--python", sys.executable, "--release", release]
    if variant != "good":
        args += ["--source", str(_source_copy(out, release, broken=variant == "broken"))]
        args += ["--reuse-wheels", str(agent_bundle(factory, "good"))]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    bundle = out / f"sekisho-agent-{release}"
    assert (bundle / "SHA256SUMS").is_file() and (out / f"sekisho-agent-{release}.tar.gz").is_file()
    _built[variant] = bundle
    return bundle
