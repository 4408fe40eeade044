"""The real usbguard-daemon judging mocked USB devices (its umockdev backend), for tests and the USB benchmark.

testbed.md: Debian's usbguard 1.1.2 runs with ``DeviceManagerBackend=umockdev``; it loads every umockdev
file in ``USBGUARD_UMOCKDEV_DEVICEDIR`` at start and watches the folder (inotify): a file hard-linked in
is a plug (the daemon adds it to its own umockdev testbed and emits an ``add`` uevent there), a file
removed is an unplug. Its FileAudit log carries every decision, stamped with the daemon's clock (wall
time, millisecond resolution). Each daemon here gets its own folder (config, rules, audit log, and its
testbed through TMPDIR) and its own network namespace, so its IPC socket (abstract, per namespace)
cannot meet a system usbguard's; it is killed (SIGKILL) when done: everything it holds is in its folder.

``tests/test_usb_usbguard.py`` compares verdicts and device hashes with it; ``sekisho bench usb
--vs-usbguard`` times it against the guard on the same plugs (sekisho/bench/usb_vs_usbguard.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sekisho.drivers.usb.descriptors import build_descriptors

DAEMON = "/usr/sbin/usbguard-daemon"
PARSER = "usbguard-rule-parser"
PRELOAD = "libumockdev-preload.so.0"

_AUDIT_LINE = re.compile(rb"^\[(\d+(?:\.\d+)?)\] \(A\) (.*)$")
_AUDIT_FIELD = re.compile(r"([\w.]+)='([^']*)'")


def usbguard_unavailable() -> str | None:
    """Return why the daemon cannot run here (missing tools, no network namespace), or None when it can."""
    for tool in (DAEMON, PARSER, "umockdev-run", "umockdev-wrapper", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install usbguard umockdev util-linux)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"cannot give the daemon its own network namespace (unshare --net): {probe.stderr.strip()}"
    return None


@dataclass(frozen=True)
class UmockdevDevice:
    """One device of a umockdev file: its sysfs path, text attributes (raw bytes) and descriptors."""

    path: str
    attributes: dict[str, bytes]
    descriptors: bytes | None = None
    devtype: str = "usb_device"

    @property
    def sys_name(self) -> str:
        """Return the last component of the sysfs path (``usb1``, ``1-2``)."""
        return self.path.rsplit("/", 1)[1]

    def record(self) -> str:
        """Return the device as a umockdev record (``P:``, ``E:`` and binary ``H:`` lines)."""
        subsystem = "usb" if self.devtype else "pci"
        lines = [f"P: {self.path}", f"E: SUBSYSTEM={subsystem}"]
        if self.devtype:
            lines.append(f"E: DEVTYPE={self.devtype}")
        # Binary (H:) attributes carry any byte exactly, as the kernel's files would.
        lines += [f"H: {name}={value.hex().upper()}" for name, value in self.attributes.items()]
        if self.descriptors is not None:
            lines.append(f"H: descriptors={self.descriptors.hex().upper()}")
        return "\n".join(lines) + "\n"


def pci_controller(path: str) -> UmockdevDevice:
    """Return a PCI host controller record (a USB device's file must include its parents)."""
    return UmockdevDevice(path, {"vendor": b"0x8086\n"}, devtype="")


def usb_device(
    path: str,
    vendor: int,
    product: int,
    interfaces: tuple[tuple[int, int, int], ...],
    *,
    name: bytes | None = None,
    serial: bytes | None = None,
    connect_type: bytes | None = b"hotplug\n",
    device_class: int = 0,
    descriptors: bytes | None = None,
    alternates: tuple[tuple[int, int, int, int], ...] = (),
) -> UmockdevDevice:
    """Return a USB device record with the attributes usbguard and sekisho read, descriptors synthesised."""
    attributes = {
        "idVendor": f"{vendor:04x}\n".encode(),
        "idProduct": f"{product:04x}\n".encode(),
        "bDeviceClass": f"{device_class:02x}\n".encode(),
        "bDeviceSubClass": b"00\n",
        "bDeviceProtocol": b"00\n",
        "authorized": b"1\n",
    }
    if path.rsplit("/", 1)[1].startswith("usb"):
        attributes["authorized_default"] = b"1\n"
    for key, value in (("product", name), ("serial", serial), ("port/connect_type", connect_type)):
        if value is not None:
            attributes[key] = value
    if descriptors is None:
        descriptors = build_descriptors(
            vendor_id=vendor,
            product_id=product,
            device_class=device_class,
            interfaces=interfaces,
            has_serial=serial is not None,
            alternates=alternates,
        )
    return UmockdevDevice(path, attributes, descriptors)


def write_umockdev(path: Path, devices: list[UmockdevDevice]) -> Path:
    """Write devices (parents first) as one umockdev file; return its path."""
    path.write_text("\n".join(device.record() for device in devices))
    return path


@dataclass(frozen=True)
class AuditRecord:
    """One FileAudit line: the daemon's timestamp (wall clock, ms resolution) and its ``key='value'`` fields."""

    timestamp: float
    fields: dict[str, str]

    @property
    def type(self) -> str:
        """Return the event type (``Device.Insert``, ``Policy.Device.Update``, ``Device.Remove`` …)."""
        return self.fields.get("type", "")

    @property
    def sys_name(self) -> str:
        """Return the device's sys name (last component of ``device.system_name``), or ``""``."""
        return self.fields.get("device.system_name", "").rsplit("/", 1)[-1]


@dataclass
class UsbguardDaemon:
    """Our own usbguard-daemon in ``work``: config, rules, audit log, device folder; start, watch, kill."""

    work: Path
    rules: str
    controllers: str = "keep"
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True)
        self.devices.mkdir()
        self.rule_file.write_bytes(self.rules.encode("utf-8", "surrogateescape"))
        self.config.write_text(
            "\n".join(
                [
                    f"RuleFile={self.rule_file}",
                    "ImplicitPolicyTarget=block",
                    "PresentDevicePolicy=apply-policy",
                    f"PresentControllerPolicy={self.controllers}",
                    "InsertedDevicePolicy=apply-policy",
                    "AuthorizedDefault=none",
                    "RestoreControllerDeviceState=false",
                    "DeviceManagerBackend=umockdev",
                    "IPCAllowedUsers=root",
                    "DeviceRulesWithPort=false",
                    "AuditBackend=FileAudit",
                    f"AuditFilePath={self.audit}",
                    "HidePII=false",
                    "",
                ]
            )
        )
        # The daemon refuses a config or rules file others can read or write.
        for path in (self.rule_file, self.config):
            path.chmod(0o600)

    @property
    def devices(self) -> Path:
        """Return the folder the daemon watches for umockdev files (USBGUARD_UMOCKDEV_DEVICEDIR)."""
        return self.work / "devices"

    @property
    def rule_file(self) -> Path:
        """Return the daemon's rules file."""
        return self.work / "rules.conf"

    @property
    def config(self) -> Path:
        """Return the daemon's configuration file."""
        return self.work / "usbguard-daemon.conf"

    @property
    def audit(self) -> Path:
        """Return the daemon's FileAudit log."""
        return self.work / "audit.log"

    @property
    def log_path(self) -> Path:
        """Return the file the daemon's stdout and stderr go to."""
        return self.work / "daemon.log"

    def plug(self, source: Path, name: str | None = None) -> float:
        """Hard-link a umockdev file into the device folder (a plug); return the wall time of the link.

        A hard link, not a copy: the daemon reads the file when inotify reports it and must never
        see it half-written.
        """
        target = self.devices / (name or source.name)
        started = time.time()
        os.link(source, target)
        return started

    def unplug(self, name: str) -> None:
        """Remove a umockdev file from the device folder (an unplug of every device in it)."""
        (self.devices / name).unlink()

    def start(self) -> None:
        """Start the daemon under umockdev-wrapper in its own network namespace."""
        env = {**os.environ, "USBGUARD_UMOCKDEV_DEVICEDIR": str(self.devices), "TMPDIR": str(self.work)}
        with self.log_path.open("wb") as log:
            # umockdev-wrapper preloads umockdev; the daemon builds its own testbed in TMPDIR.
            self._process = subprocess.Popen(
                ["unshare", "--net", "umockdev-wrapper", DAEMON, "-k", "-P", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def running(self) -> bool:
        """Return whether the daemon process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Return the daemon's exit status, None while it runs (or before it started)."""
        return None if self._process is None else self._process.poll()

    def testbed(self) -> Path | None:
        """Return the daemon's umockdev testbed folder (its mocked /sys), once it has made it."""
        found = sorted(self.work.glob("umockdev.*"))
        return found[0] if found else None

    def read_audit(self) -> list[AuditRecord]:
        """Return the audit records written since the last call (complete lines only)."""
        try:
            with self.audit.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        records = []
        for line in data[:end].split(b"\n"):
            match = _AUDIT_LINE.match(line)
            if match is None:
                continue
            text = match.group(2).decode("utf-8", "surrogateescape")
            records.append(AuditRecord(float(match.group(1)), dict(_AUDIT_FIELD.findall(text))))
        return records

    def stop(self) -> None:
        """Kill the daemon (SIGKILL: after a reject under umockdev it ignores SIGTERM) and reap it; idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def log(self) -> str:
        """Return what the daemon printed."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> UsbguardDaemon:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
