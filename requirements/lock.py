"""The dependency locks: write them, check them against pyproject.toml, and make a venv match one exactly.

Used by ./dev.sh (standard library only: it runs before the venv has anything in it).

    python requirements/lock.py check                 exit 1 when pyproject.toml and the locks disagree
    python requirements/lock.py compile [--upgrade]   rewrite the locks (needs pip-tools in the venv)
    python requirements/lock.py sync VENV [SET]       install exactly requirements/SET.txt (default dev)
    python requirements/lock.py install VENV [SET]    install the lock's packages only (no project, no removal)
    python requirements/lock.py verify VENV [SET]     exit 1 unless the venv's packages equal the lock

Packages in SOURCE_BUILDS are built here from their hash-locked source archive with the settings given
there instead of installed from the prebuilt wheel (the sdist's sha256 is in the lock like every wheel's).

The three sets: agent (terminal and door hosts: no FastAPI, SQLAlchemy, uvicorn, PyYAML), controller
(no pyscard, pyusb, libosdp, …) and dev (both, plus the test and lint tools). Each lock carries a
fingerprint of the dependency tables of pyproject.toml, so an edit there without a new lock is caught
before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYPROJECT = ROOT / "pyproject.toml"
SETS = {"agent": ["agent"], "controller": ["controller"], "dev": ["dev"]}
FINGERPRINT = "# pyproject-fingerprint: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
# libosdp polls each reader once OSDP_PD_POLL_TIMEOUT_MS have passed since its last reply, a compile-time
# constant that is 50 ms in the published wheels: a card would wait up to 50 ms at the reader. 10 ms keeps
# OSDP end to end under 30 ms at p99 on a busy machine (15 ms did not, once in three runs; docs/benchmarks.md)
# and costs no measurable CPU (the link's idle load is its own wake-ups). It is a minimum gap, not a rate: on
# a slow or shared RS-485 line the exchanges themselves space the polls. Needs gcc and the Python headers, as
# pyscard does.
SOURCE_BUILDS = {"libosdp": {"CFLAGS": "-DOSDP_PD_POLL_TIMEOUT_MS=10"}}
BUILD_MARKER = "sekisho-source-builds.json"


def fingerprint() -> str:
    """Hash the parts of pyproject.toml that decide what gets installed."""
    data = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    wanted = {
        "build": data.get("build-system", {}).get("requires", []),
        "dependencies": data["project"].get("dependencies", []),
        "extras": data["project"].get("optional-dependencies", {}),
        "requires-python": data["project"].get("requires-python", ""),
        "build-in": (HERE / "build.in").read_text(encoding="utf-8"),
    }
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()


def lock_path(name: str) -> Path:
    """Return the lock file of one install set."""
    return HERE / f"{name}.txt"


def pins(name: str) -> dict[str, str]:
    """Return {normalised name: version} pinned in one lock."""
    found: dict[str, str] = {}
    for line in lock_path(name).read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            found[_normalise(match.group(1))] = match.group(2)
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check() -> int:
    """Return 0 when every lock was written from the pyproject.toml that is here now."""
    expected = fingerprint()
    stale = []
    for name in SETS:
        path = lock_path(name)
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        first = next((line for line in lines if line.startswith(FINGERPRINT)), "")
        if first.removeprefix(FINGERPRINT).strip() != expected:
            stale.append(path.name)
    if stale:
        print(
            f"pyproject.toml and the dependency lock disagree ({', '.join(stale)} written for another "
            "pyproject.toml).\nRun ./dev.sh upgrade to write the locks again (and commit them with the "
            "pyproject.toml change), or undo the pyproject.toml edit.",
            file=sys.stderr,
        )
        return 1
    return 0


def compile_locks(upgrade: bool) -> int:
    """Write the three locks with pip-compile: hashes for every file, no index or path of this machine."""
    for name, extras in SETS.items():
        out = lock_path(name)
        command = [
            sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
            "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--no-emit-trusted-host",
            "--output-file", out.name, *[f"--extra={extra}" for extra in extras], "../pyproject.toml", "build.in",
        ]  # fmt: skip
        if upgrade:
            command.append("--upgrade")
        env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "./dev.sh upgrade"}
        subprocess.run(command, cwd=HERE, check=True, env=env)
        out.write_text(_finish(out.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


def _finish(text: str) -> str:
    """Drop the project's own self-reference (a local path) and put the fingerprint on top."""
    lines = text.splitlines()
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith(("sekisho @ ", "# WARNING: pip install will require", "# Consider using a hashable URL")):
            skipping = line.startswith("sekisho @ ")
            continue
        if skipping and line.startswith("    "):
            continue
        skipping = False
        kept.append(line)
    return f"{FINGERPRINT}{fingerprint()}\n" + "\n".join(kept) + "\n"


def _venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def installed(venv: Path) -> dict[str, str]:
    """Return {normalised name: version} of what the venv holds, the project itself left out."""
    out = subprocess.run(
        [_venv_python(venv), "-m", "pip", "list", "--format=json", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return {_normalise(item["name"]): item["version"] for item in json.loads(out) if item["name"] != "sekisho"}


def _entries(name: str) -> list[tuple[str | None, list[str]]]:
    """Split one lock into (normalised package name or None for comments, its lines)."""
    entries: list[tuple[str | None, list[str]]] = []
    for line in lock_path(name).read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            entries.append((_normalise(match.group(1)), [line]))
        elif line.startswith((" ", "\t")) and entries and entries[-1][0] is not None:
            entries[-1][1].append(line)
        else:
            entries.append((None, [line]))
    return entries


def _write_part(path: Path, entries: list[tuple[str | None, list[str]]]) -> None:
    path.write_text("".join(line + "\n" for _, lines in entries for line in lines), encoding="utf-8")


def install(venv: Path, name: str) -> int:
    """Install one lock's packages with their hashes; SOURCE_BUILDS from their locked source archive."""
    import tempfile

    python = _venv_python(venv)
    quiet = ["--quiet", "--disable-pip-version-check"]
    entries = _entries(name)
    built = [(package, lines) for package, lines in entries if package in SOURCE_BUILDS]
    with tempfile.TemporaryDirectory(prefix="sekisho-lock-") as tmp:
        rest = Path(tmp) / "rest.txt"
        _write_part(rest, [entry for entry in entries if entry[0] not in SOURCE_BUILDS])
        pip = [python, "-m", "pip", "install", *quiet, "--require-hashes", "--no-deps"]
        subprocess.run([*pip, "-r", str(rest)], check=True)
        marker: dict[str, dict[str, str]] = {}
        for package, lines in built:
            assert package is not None
            part = Path(tmp) / f"{package}.txt"
            _write_part(part, [(package, lines)])
            env = dict(os.environ)
            flags = SOURCE_BUILDS[package]["CFLAGS"]
            env["CFLAGS"] = f"{env.get('CFLAGS', '')} {flags}".strip()
            # No cache: a wheel pip built earlier from the same archive with other flags must not be reused.
            # No isolation: the build back-end is the locked setuptools already installed above.
            subprocess.run(
                [*pip, "--no-binary", package, "--no-build-isolation", "--no-cache-dir", "--force-reinstall",
                 "-r", str(part)],
                check=True, env=env,
            )  # fmt: skip
            marker[package] = {"version": pins(name)[package], "CFLAGS": flags}
    (venv / BUILD_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    return 0


def source_builds_ok(venv: Path, name: str) -> bool:
    """Return whether each SOURCE_BUILDS package of the lock was built here with the settings of SOURCE_BUILDS."""
    want = {
        package: {"version": version, "CFLAGS": SOURCE_BUILDS[package]["CFLAGS"]}
        for package, version in pins(name).items()
        if package in SOURCE_BUILDS
    }
    try:
        have = json.loads((venv / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        have = {}
    return all(have.get(package) == spec for package, spec in want.items())


def sync(venv: Path, name: str) -> int:
    """Install exactly one lock into the venv (hashes required), remove the rest, install the project."""
    python = _venv_python(venv)
    quiet = ["--quiet", "--disable-pip-version-check"]
    install(venv, name)
    extra = sorted(set(installed(venv)) - set(pins(name)))
    if extra:
        subprocess.run([python, "-m", "pip", "uninstall", *quiet, "--yes", *extra], check=True)
    # No build isolation: the build back-end is the locked setuptools, not whatever is newest today.
    subprocess.run(
        [python, "-m", "pip", "install", *quiet, "--no-deps", "--no-build-isolation", "--editable", str(ROOT)],
        check=True,
    )
    return verify(venv, name)


def verify(venv: Path, name: str) -> int:
    """Return 0 when the venv holds exactly the packages and versions of the lock."""
    have, want = installed(venv), pins(name)
    built = source_builds_ok(venv, name)
    if not built:
        print(f"  {', '.join(SOURCE_BUILDS)}: not built from source with {SOURCE_BUILDS} (run sync)", file=sys.stderr)
    if have == want and built:
        return 0
    for package in sorted(set(have) | set(want)):
        if have.get(package) != want.get(package):
            print(f"  {package}: venv {have.get(package, '-')}, lock {want.get(package, '-')}", file=sys.stderr)
    print(f"{venv} does not match requirements/{name}.txt", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    """Dispatch the sub-commands."""
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["compile"]:
        return compile_locks(upgrade="--upgrade" in argv[1:])
    if argv[:1] in (["sync"], ["verify"], ["install"]) and len(argv) in (2, 3):
        name = argv[2] if len(argv) == 3 else "dev"
        if name not in SETS:
            print(f"unknown install set {name!r} (one of {', '.join(SETS)})", file=sys.stderr)
            return 2
        return {"sync": sync, "verify": verify, "install": install}[argv[0]](Path(argv[1]), name)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
