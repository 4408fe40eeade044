"""What a fresh machine installs: exactly the locks, one `sekisho` namespace, agent hosts without the controller."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
SERVER_ONLY = {"fastapi", "sqlalchemy", "uvicorn", "pyyaml", "alembic", "psycopg", "starlette"}
HARDWARE_ONLY = {"pyscard", "pyusb", "pyudev", "libosdp", "pyserial", "jeepney"}


def _pins(name: str) -> dict[str, str]:
    sys.path.insert(0, str(LOCKS))
    try:
        import lock  # requirements/lock.py, a stand-alone script

        return lock.pins(name)
    finally:
        sys.path.remove(str(LOCKS))


def _lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "requirements" / "lock.py"), "check"], capture_output=True, text=True, timeout=60
    )


def test_the_locks_were_written_from_this_pyproject() -> None:
    run = _lock_check(ROOT)
    assert run.returncode == 0, run.stderr


def test_an_edited_pyproject_without_a_new_lock_is_refused(tmp_path: Path) -> None:
    shutil.copytree(LOCKS, tmp_path / "requirements", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    edited = text.replace('"psutil>=5.9",', '"psutil>=5.9",\n  "requests",')
    assert edited != text
    (tmp_path / "pyproject.toml").write_text(edited, encoding="utf-8")
    run = _lock_check(tmp_path)
    assert run.returncode == 1
    assert "pyproject.toml and the dependency lock disagree" in run.stderr
    assert "./dev.sh upgrade" in run.stderr


def test_every_lock_pins_with_hashes_and_agrees_with_the_others() -> None:
    locks = {name: _pins(name) for name in ("agent", "controller", "dev")}
    for name in locks:
        text = (LOCKS / f"{name}.txt").read_text(encoding="utf-8")
        assert "--hash=sha256:" in text
        assert "file://" not in text and "--index-url" not in text and "--find-links" not in text
    # One version of a package everywhere: an agent host runs what the tests ran.
    for name in ("agent", "controller"):
        for package, version in locks[name].items():
            assert locks["dev"].get(package) == version, (name, package)
    assert not SERVER_ONLY & set(locks["agent"]), "an agent host must not get the controller's stack"
    assert not HARDWARE_ONLY & set(locks["controller"]), "a controller host must not get device drivers"


def test_the_venv_holds_exactly_the_dev_lock() -> None:
    """`pip freeze` of the project venv equals requirements/dev.txt (the project itself aside)."""
    venv = Path(sys.prefix)
    run = subprocess.run(
        [sys.executable, str(LOCKS / "lock.py"), "verify", str(venv), "dev"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built with the locked setuptools (no build isolation) as a release would be."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build-src")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = build / "sekisho"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "var", "build", "*.egg-info", "__pycache__", ".*_cache"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    (found,) = out.glob("sekisho-*.whl")
    return found


def test_the_wheel_puts_only_sekisho_at_the_top_and_leaves_the_harness_out(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"sekisho"}
    for part in ("agents", "controller", "deploy", "drivers", "protocol"):
        assert f"sekisho/{part}/__init__.py" in names
    assert "sekisho/controller/store/migrations/env.py" in names
    assert "sekisho/controller/store/migrations/script.py.mako" in names
    for console_file in ("templates/base.html", "locale/ja/LC_MESSAGES/messages.po", "static/console.css"):
        assert f"sekisho/controller/console/{console_file}" in names
    for harness in ("sekisho/lab/", "sekisho/bench/", "sekisho/firmware_stubs/"):
        assert not [n for n in names if n.startswith(harness)], f"{harness} must not ship"


def test_an_agent_host_install_has_no_controller_stack(wheel: Path, tmp_path: Path) -> None:
    """Install requirements/agent.txt and the wheel into a new venv, as a terminal would be set up."""
    venv = tmp_path / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # As ./dev.sh and the agent installer do it: hashes required, libosdp built from its locked source archive.
    subprocess.run([sys.executable, str(LOCKS / "lock.py"), "install", str(venv), "agent"], check=True, timeout=900)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=300)
    verify = subprocess.run(
        [sys.executable, str(LOCKS / "lock.py"), "verify", str(venv), "agent"], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    probe = (
        "import importlib.util, sys\n"
        "import sekisho.agents.runtime.cli, sekisho.agents.doors.cli, sekisho.agents.login.cli\n"
        f"for name in {sorted(SERVER_ONLY)!r} + ['agents', 'controller', 'deploy', 'drivers', 'protocol']:\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "print('ok')\n"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    agent = subprocess.run(
        [str(venv / "bin" / "sekisho-agent"), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert agent.returncode == 0 and "pam-auth" in agent.stdout, agent.stderr
    controller = subprocess.run(
        [str(venv / "bin" / "sekisho"), "demo"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert controller.returncode == 2 and "this install has no controller" in controller.stderr
    assert "Traceback" not in controller.stderr


def test_a_bare_top_level_import_fails_even_from_the_checkout() -> None:
    """`import agents` from the repository root would load a second copy of the modules: it must fail."""
    for name in ("agents", "controller", "deploy", "drivers", "protocol", "firmware_stubs"):
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode != 0, name
        assert f"sekisho.{name}" in run.stderr
