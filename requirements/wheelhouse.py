"""Turn a dependency lock into a wheelhouse an offline host can install from, with hashes it can check.

Used by deploy/build-agent-bundle.sh on a connected build machine (same Debian release, CPU and Python
minor version as the agent hosts). Standard library and pip only.

    python requirements/wheelhouse.py deps OUT [SET]        every package of requirements/SET.txt as a wheel
    python requirements/wheelhouse.py project SOURCE OUT    the project's own wheel, built from a clean copy
    python requirements/wheelhouse.py lock OUT [SET]        write OUT/requirements.txt and OUT/wheelhouse.json

Why a second lock: the agent hosts install with ``--require-hashes --no-index`` from the wheels alone, but
a package published only as source (pyscard) or built here with other settings (lock.SOURCE_BUILDS) becomes
a wheel whose hash no lock can know in advance. Its source archive's hash was checked against the lock
before it was built; the wheelhouse lock then pins the hash of the very wheel built from it. Every other
wheel must carry a hash the original lock lists, or the wheelhouse is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lock  # noqa: E402  (requirements/lock.py, the stand-alone lock tool beside this one)

_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-(?:\d[^-]*-)?(?P<tags>[^-]+-[^-]+-[^-]+)\.whl$")
MANIFEST = "wheelhouse.json"
SOURCE_BUILD_MARKER = "source-builds.json"
PIP = ["--disable-pip-version-check", "--quiet"]


def _source_builds() -> dict[str, dict[str, str]]:
    return dict(getattr(lock, "SOURCE_BUILDS", {}))


def locked_hashes(name: str) -> dict[str, set[str]]:
    """Return {normalised package: sha256 hashes the lock accepts for its pinned version}."""
    found: dict[str, set[str]] = {}
    current: str | None = None
    for line in lock.lock_path(name).read_text(encoding="utf-8").splitlines():
        match = lock._PIN.match(line)
        if match:
            current = lock._normalise(match.group(1))
            found[current] = set()
        elif not line.startswith((" ", "\t")):
            current = None
        if current is not None:
            found[current].update(_HASH.findall(line))
    return found


def sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env, timeout=1800)


def build_deps(out: Path, name: str) -> int:
    """Fetch (hash-checked) or build every package of one lock into ``out`` as wheels."""
    out.mkdir(parents=True, exist_ok=True)
    special = _source_builds()
    entries = lock._entries(name) if hasattr(lock, "_entries") else None
    with tempfile.TemporaryDirectory(prefix="sekisho-wheelhouse-") as tmp:
        rest = Path(tmp) / "rest.txt"
        if entries is None:
            shutil.copyfile(lock.lock_path(name), rest)
        else:
            lock._write_part(rest, [entry for entry in entries if entry[0] not in special])
        # pip wheel checks every downloaded file (wheel or source archive) against the lock's hashes.
        _pip("wheel", *PIP, "--require-hashes", "--no-deps", "-r", str(rest), "-w", str(out))
        for package, lines in entries or []:
            if package not in special:
                continue
            part = Path(tmp) / f"{package}.txt"
            lock._write_part(part, [(package, lines)])
            env = dict(os.environ)
            env["CFLAGS"] = f"{env.get('CFLAGS', '')} {special[package]['CFLAGS']}".strip()
            # As lock.py installs it: from the locked source archive, with its flags, never a cached wheel.
            _pip(
                "wheel", *PIP, "--require-hashes", "--no-deps", "--no-binary", package, "--no-build-isolation",
                "--no-cache-dir", "-r", str(part), "-w", str(out), env=env,
            )  # fmt: skip
    return 0


def build_project(source: Path, out: Path) -> Path:
    """Build the project's wheel from a clean copy of ``source`` (setuptools writes build/ beside the sources)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sekisho-project-") as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(
            source,
            copy,
            symlinks=True,
            ignore=shutil.ignore_patterns(".venv", ".git", "var", "build", "*.egg-info", "__pycache__", ".*_cache"),
        )
        before = set(out.glob("sekisho-*.whl"))
        # No build isolation: the build back-end is the locked setuptools of this venv.
        _pip("wheel", *PIP, "--no-deps", "--no-build-isolation", "-w", str(out), str(copy))
        made = sorted(set(out.glob("sekisho-*.whl")) - before) or sorted(out.glob("sekisho-*.whl"))
    if len(made) != 1:
        raise SystemExit(f"expected one sekisho wheel in {out}, found {[p.name for p in made]}")
    return made[0]


def write_lock(out: Path, name: str) -> int:
    """Check the wheels in ``out`` against the lock and write the wheelhouse lock and manifest."""
    want = lock.pins(name)
    accepted = locked_hashes(name)
    special = _source_builds()
    packages: dict[str, dict[str, str]] = {}
    lines: list[str] = []
    problems: list[str] = []
    for wheel in sorted(out.glob("*.whl")):
        match = _WHEEL.match(wheel.name)
        if match is None:
            problems.append(f"{wheel.name}: not a wheel file name")
            continue
        package, version = lock._normalise(match.group("name")), match.group("version")
        digest = sha256(wheel)
        if package == "sekisho":
            origin = "project"
        elif want.get(package) != version:
            problems.append(f"{wheel.name}: the lock pins {package}=={want.get(package, '(nothing)')}")
            continue
        elif package in special:
            origin = "built-with-flags"
        elif digest in accepted.get(package, set()):
            origin = "locked"
        else:
            # Built here from a source archive pip checked against the lock (no wheel for this platform).
            origin = "built"
        if package in packages:
            problems.append(f"{wheel.name}: a second wheel of {package}")
            continue
        packages[package] = {"version": version, "file": wheel.name, "sha256": digest, "origin": origin}
        lines.append(f"{package}=={version} --hash=sha256:{digest}")
    missing = sorted(set(want) - set(packages))
    if missing:
        problems.append(f"no wheel for {', '.join(missing)}")
    if "sekisho" not in packages:
        problems.append("no sekisho wheel (run `project` first)")
    if problems:
        for problem in problems:
            print(f"wheelhouse: {problem}", file=sys.stderr)
        return 1
    header = (
        "# The wheels of this bundle, each pinned to the hash of the very file beside it\n"
        "# (written by requirements/wheelhouse.py).\n"
        f"# From requirements/{name}.txt; install with --no-index --find-links wheels --require-hashes --no-deps.\n"
    )
    (out.parent / "requirements.txt").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    manifest = {
        "set": name,
        "project_version": packages["sekisho"]["version"],
        "python_tag": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "platform": sysconfig.get_platform(),
        "packages": packages,
    }
    (out.parent / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    marker = {p: {"version": want[p], "CFLAGS": spec["CFLAGS"]} for p, spec in special.items() if p in want}
    (out.parent / SOURCE_BUILD_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str]) -> int:
    """Dispatch the sub-commands."""
    if argv[:1] == ["deps"] and len(argv) in (2, 3):
        return build_deps(Path(argv[1]), argv[2] if len(argv) == 3 else "agent")
    if argv[:1] == ["project"] and len(argv) == 3:
        print(build_project(Path(argv[1]), Path(argv[2])))
        return 0
    if argv[:1] == ["lock"] and len(argv) in (2, 3):
        return write_lock(Path(argv[1]), argv[2] if len(argv) == 3 else "agent")
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
