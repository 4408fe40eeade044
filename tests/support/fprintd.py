"""A real fprintd with libfprint's ``virtual_device`` on a private system bus, for the biometric tests.

Nothing here touches the machine's own system bus: the private ``dbus-daemon`` listens on a socket in
a temp directory and its address is handed only to the child processes started here (through their
own environment) and to the backend under test (as an explicit constructor argument). D-Bus calls
made by the fixture itself go through ``dbus-send --bus=…`` so that only ``drivers/`` imports a D-Bus
library.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

FPRINTD = Path("/usr/libexec/fprintd")
DBUS_DAEMON = "dbus-daemon"
DBUS_SEND = "dbus-send"
SYSTEM_PYTHON = Path("/usr/bin/python3")
FPRINTD_ENROLL = "fprintd-enroll"
# Every wait in this module is bounded by this (seconds) unless the caller passes its own.
START_TIMEOUT = 10.0
FPRINT_NAME = "net.reactivated.Fprint"
POLKIT_NAME = "org.freedesktop.PolicyKit1"

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


def missing_prerequisites() -> str | None:
    """Return why the real fprintd stack cannot run on this machine, or None when it can."""
    missing = [str(FPRINTD)] if not FPRINTD.exists() else []
    missing += [tool for tool in (DBUS_DAEMON, DBUS_SEND, FPRINTD_ENROLL) if shutil.which(tool) is None]
    if not SYSTEM_PYTHON.exists():
        missing.append(str(SYSTEM_PYTHON))
    else:
        probe = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", "import dbusmock"], capture_output=True, timeout=START_TIMEOUT, check=False
        )
        if probe.returncode != 0:
            missing.append("python3-dbusmock (for /usr/bin/python3)")
    if not missing:
        return None
    return (
        "fprintd test stack unavailable, missing: " + ", ".join(missing) + " (apt-get install fprintd libfprint-2-2 "
        "libpam-fprintd dbus python3-dbusmock)"
    )


def _wait_for(predicate: object, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` or if ``proc`` died."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Terminate one process we started, escalating to SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@dataclass
class FprintdStack:
    """A private system bus, a polkit stand-in that allows everything, and fprintd with a virtual sensor."""

    root: Path
    bus_socket: Path = field(init=False)
    device_socket: Path = field(init=False)
    state_dir: Path = field(init=False)
    log_dir: Path = field(init=False)
    _bus: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _polkit: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _fprintd: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be long, so keep names short.
        self.bus_socket = self.root / "bus"
        self.device_socket = self.root / "v.sock"
        self.state_dir = self.root / "state"
        self.log_dir = self.root / "logs"

    @property
    def address(self) -> str:
        """Return the D-Bus address of the private system bus."""
        return f"unix:path={self.bus_socket}"

    def child_env(self) -> dict[str, str]:
        """Return an environment for a child process that should see the private bus as its system bus."""
        env = dict(os.environ)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        # A session bus the child might fall back to must not be the developer's either.
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        return env

    def __enter__(self) -> FprintdStack:
        """Start the bus, polkit stand-in and fprintd; stop whatever started if any step fails."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every process this stack started."""
        self.close()

    def _log(self, name: str) -> int:
        """Open a log file for a child's output (read in failure messages, never asserted on)."""
        return os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start one child with its output in logs/<name>.log."""
        fd = self._log(name)
        try:
            return subprocess.Popen(argv, env=env, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL)
        finally:
            os.close(fd)

    def _start(self) -> None:
        """Bring the stack up step by step, each step bounded by START_TIMEOUT."""
        self.start_bus()
        self._polkit = self.spawn(
            "polkit", [str(SYSTEM_PYTHON), "-m", "dbusmock", "--system", "--template", "polkitd"], self.child_env()
        )
        _wait_for(lambda: self.has_owner(POLKIT_NAME), "polkit stand-in", START_TIMEOUT, self._polkit)
        # Without this the stand-in denies every action and fprintd answers PermissionDenied.
        self.call(
            POLKIT_NAME,
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.DBus.Mock.AllowUnknown",
            "boolean:true",
        )
        self.start_fprintd()

    def start_bus(self) -> None:
        """Start only the private system bus (a config of type system in the temp directory)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        conf = self.root / "bus.conf"
        conf.write_text(_BUS_CONF.format(socket=self.bus_socket))
        argv = [DBUS_DAEMON, f"--config-file={conf}", "--nofork", "--nopidfile"]
        self._bus = self.spawn("dbus", argv, self.child_env())
        _wait_for(self.bus_socket.exists, "private dbus-daemon", START_TIMEOUT, self._bus)

    def start_fprintd(self) -> None:
        """Start fprintd (again) on the private bus with the virtual sensor; wait until it owns its name."""
        env = self.child_env()
        env["FP_VIRTUAL_DEVICE"] = str(self.device_socket)
        env["STATE_DIRECTORY"] = str(self.state_dir)
        # -t: no idle exit, so the daemon does not vanish between two test steps.
        self._fprintd = self.spawn("fprintd", [str(FPRINTD), "-t"], env)
        _wait_for(lambda: self.has_owner(FPRINT_NAME), "fprintd", START_TIMEOUT, self._fprintd)

    def stop_fprintd(self) -> None:
        """Stop fprintd, leaving the bus and polkit stand-in running; wait until its name is gone."""
        _stop(self._fprintd)
        self._fprintd = None
        _wait_for(lambda: not self.has_owner(FPRINT_NAME), "fprintd name released", START_TIMEOUT)

    def close(self) -> None:
        """Stop fprintd, the polkit stand-in and the bus, in that order."""
        for proc in (self._fprintd, self._polkit, self._bus):
            with contextlib.suppress(Exception):
                _stop(proc)
        self._fprintd = self._polkit = self._bus = None

    def call(self, dest: str, path: str, method: str, *args: str, timeout: float = START_TIMEOUT) -> str:
        """Call a method on the private bus with dbus-send and return its printed reply."""
        argv = [
            DBUS_SEND,
            f"--bus={self.address}",
            "--print-reply",
            f"--reply-timeout={int(timeout * 1000)}",
            f"--dest={dest}",
            path,
            method,
            *args,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"dbus-send {method} failed: {done.stderr.strip()}")
        return done.stdout

    def emit(self, path: str, signal_name: str, *args: str) -> None:
        """Emit a signal on the private bus from a connection that is not fprintd (a spoofing attempt)."""
        argv = [DBUS_SEND, f"--bus={self.address}", "--type=signal", path, signal_name, *args]
        subprocess.run(argv, capture_output=True, timeout=START_TIMEOUT, check=True)

    def has_owner(self, name: str) -> bool:
        """Return whether ``name`` currently has an owner on the private bus."""
        try:
            reply = self.call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                f"string:{name}",
                timeout=2.0,
            )
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return "boolean true" in reply

    def log_text(self, name: str) -> str:
        """Return a child's log so far (for failure messages)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def send_device_command(self, command: str, timeout: float = START_TIMEOUT) -> None:
        """Write one command (e.g. ``SCAN alice-finger``) to the virtual sensor, waiting for its socket."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            # The virtual device listens only while fprintd has it open (claimed), so retry until then.
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.connect(str(self.device_socket))
                    sock.sendall(command.encode())
                return
            except OSError as err:
                last = err
                time.sleep(0.02)
        raise TimeoutError(f"virtual sensor socket {self.device_socket} not accepting {command!r}: {last}")

    def scan(self, finger_id: str, timeout: float = START_TIMEOUT) -> None:
        """Touch the virtual sensor with the finger called ``finger_id``."""
        self.send_device_command(f"SCAN {finger_id}", timeout)

    def enroll(
        self, user: str, finger_id: str, *, finger: str = "right-index-finger", touches: int = 5, timeout: float = 30.0
    ) -> str:
        """Enrol ``finger_id`` for ``user`` through fprintd-enroll on the private bus; return its output."""
        proc = subprocess.Popen(
            [FPRINTD_ENROLL, "-f", finger, user],
            env=self.child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            for _ in range(touches):
                self.scan(finger_id, timeout=timeout)
                # One touch at a time: the device consumes a command per enrolment stage.
                time.sleep(0.05)
            out, _ = proc.communicate(timeout=timeout)
        finally:
            _stop(proc)
        text = out.decode(errors="replace") if out else ""
        if proc.returncode != 0 or "enroll-completed" not in text:
            raise RuntimeError(f"fprintd-enroll {user} failed ({proc.returncode}): {text}\n{self.log_text('fprintd')}")
        return text


# A dbusmock template standing in for fprintd, for what the real daemon never does: emit VerifyStatus
# values outside its documented list, or with the wrong argument types. It owns net.reactivated.Fprint,
# so its signals come from the legitimate sender and reach the backend's filter. The statuses to emit on
# each VerifyStart come from the template parameters as [signature, [args…]] pairs.
_FAKE_FPRINTD_TEMPLATE = """
import dbus

BUS_NAME = "net.reactivated.Fprint"
MAIN_OBJ = "/net/reactivated/Fprint/Manager"
MAIN_IFACE = "net.reactivated.Fprint.Manager"
SYSTEM_BUS = True
DEVICE = "/net/reactivated/Fprint/Device/0"
DEVICE_IFACE = "net.reactivated.Fprint.Device"


def load(mock, parameters):
    mock.AddMethods(MAIN_IFACE, [("GetDefaultDevice", "", "o", "ret = dbus.ObjectPath(%r)" % DEVICE)])
    emit = "".join(
        "self.EmitSignal(%r, 'VerifyStatus', %r, %r)\\n" % (DEVICE_IFACE, sig, args)
        for sig, args in parameters.get("statuses", [])
    )
    mock.AddObject(DEVICE, DEVICE_IFACE, {}, [
        ("Claim", "s", "", ""),
        ("Release", "", "", ""),
        ("VerifyStart", "s", "", emit),
        ("VerifyStop", "", "", ""),
        ("ListEnrolledFingers", "s", "as", "ret = ['right-index-finger']"),
    ])
"""


@dataclass
class FakeFprintd:
    """A private system bus with a dbusmock 'fprintd' that emits scripted VerifyStatus signals."""

    root: Path
    statuses: list[tuple[str, list[object]]]
    bus: FprintdStack = field(init=False)
    _mock: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __enter__(self) -> FakeFprintd:
        """Start the bus (without fprintd) and the fake; stop both if anything fails."""
        self.bus = FprintdStack(self.root)
        try:
            self.bus.start_bus()
            template = self.root / "fake_fprintd.py"
            template.write_text(_FAKE_FPRINTD_TEMPLATE)
            params = json.dumps({"statuses": [[sig, list(args)] for sig, args in self.statuses]})
            self._mock = self.bus.spawn(
                "fake-fprintd",
                [str(SYSTEM_PYTHON), "-m", "dbusmock", "--system", "--template", str(template), "-p", params],
                self.bus.child_env(),
            )
            _wait_for(lambda: self.bus.has_owner(FPRINT_NAME), "fake fprintd", START_TIMEOUT, self._mock)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the fake and the bus."""
        self.close()

    @property
    def address(self) -> str:
        """Return the D-Bus address of the private system bus."""
        return self.bus.address

    def close(self) -> None:
        """Stop the fake fprintd, then the bus."""
        with contextlib.suppress(Exception):
            _stop(self._mock)
        self._mock = None
        self.bus.close()
