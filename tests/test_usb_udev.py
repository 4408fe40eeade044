"""The shipped udev rule (deploy/udev/): installer, syntax and effect under udev's own engine, helper on a real disk.

- Installer: deploy/udev/install-udev.sh on temp folders (never /etc/udev), with the care of install-pam.sh:
  backup of a rule file it replaces, rollback, a check of what it wrote, uninstall.
- Syntax and effect: Debian 12's udev (252) has no ``udevadm verify`` (systemd 254+), so the rule goes
  through ``udevadm test`` — udev's own rules parser and matching — on mocked devices (umockdev: a USB
  disk, its partition, a second LUN, a disk behind a hub, a virtio disk), inside a private mount
  namespace where udev's rules folders, /run and /dev are empty tmpfs (only our rule is read, and
  ``udevadm test`` writes its database and symlinks there, not on the machine). A parse error would
  appear as a line naming the rule file; the command udev would RUN is read back from its output.
- Helper on a real disk: that very command, as udev built it for a mocked USB device whose disk has the
  name of a real loop device, is run against the loop device: read-only without a grant, writable with
  the grant the agent's driver writes for this plug, read-only again for another plug's grant.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loopdev import loop_device, skip_reason_printed

from sekisho.drivers.usb.blockdev import BlockDevice, IoctlBlockDevices

REPO = Path(__file__).resolve().parent.parent
UDEV = REPO / "deploy" / "udev"
INSTALLER = UDEV / "install-udev.sh"
RULE_NAME = "90-sekisho-usb-ro.rules"

# --- the installer ------------------------------------------------------------------------------------


def run_installer(
    base: Path, *args: str, path: str | None = None, sbin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": path or os.environ["PATH"],
        "RULES_DIR": str(base / "rules.d"),
        "SBIN_DIR": sbin or str(base / "sbin"),
        "GRANT_DIR": str(base / "grants"),
    }
    return subprocess.run(["sh", str(INSTALLER), *args], env=env, capture_output=True, text=True, check=False)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "rules.d").mkdir()
    return tmp_path


def rule(base: Path) -> Path:
    return base / "rules.d" / RULE_NAME


def backups(base: Path) -> list[Path]:
    return sorted((base / "rules.d").glob(f"{RULE_NAME}.sekisho-backup.*"))


def test_install_writes_helper_then_rule(base: Path) -> None:
    result = run_installer(base)
    assert result.returncode == 0, result.stderr
    helper = base / "sbin" / "sekisho-usb-ro"
    assert stat.S_IMODE(helper.stat().st_mode) == 0o755
    body = helper.read_text()
    assert f'GRANT_DIR="{base / "grants"}"' in body and "@GRANT_DIR@" not in body
    text = rule(base).read_text()
    assert f'RUN+="{helper} $devnode $id $attr{{busnum}} $attr{{devnum}}"' in text
    assert "/usr/local/sbin" not in text.split("RUN+=")[1]
    assert stat.S_IMODE(rule(base).stat().st_mode) == 0o644
    assert backups(base) == []
    # Not udev's folder: nothing reloaded. Debian 12's udevadm has no verify: said so, not hidden.
    assert "udev not reloaded" in result.stdout
    assert "verification skipped" in result.stdout or "verified" in result.stdout


def test_install_twice_changes_nothing(base: Path) -> None:
    assert run_installer(base).returncode == 0
    once = rule(base).read_text()
    again = run_installer(base)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert rule(base).read_text() == once and backups(base) == []


def test_a_replaced_rule_file_is_backed_up_and_rolled_back(base: Path) -> None:
    rule(base).write_text("# the site's own rule\n")
    assert run_installer(base).returncode == 0
    [backup] = backups(base)
    assert backup.read_text() == "# the site's own rule\n"
    result = run_installer(base, "--rollback")
    assert result.returncode == 0, result.stderr
    assert rule(base).read_text() == "# the site's own rule\n"


def test_rollback_without_backup_fails_and_touches_nothing(base: Path) -> None:
    result = run_installer(base, "--rollback")
    assert result.returncode != 0 and "no backup" in result.stderr
    assert not rule(base).exists()


def test_a_rule_udev_refuses_is_rolled_back(base: Path) -> None:
    # A udev with `udevadm verify` (systemd >= 254) that refuses the file: the install undoes itself.
    fake_bin = base / "bin"
    fake_bin.mkdir()
    udevadm = fake_bin / "udevadm"
    udevadm.write_text('#!/bin/sh\n[ "$1 $2" = "verify --help" ] && exit 0\n[ "$1" = verify ] && exit 1\nexit 0\n')
    udevadm.chmod(0o755)
    rule(base).write_text("# the site's own rule\n")
    refused = run_installer(base, path=f"{fake_bin}:{os.environ['PATH']}")
    assert refused.returncode != 0 and "rolling back" in refused.stdout
    assert rule(base).read_text() == "# the site's own rule\n"
    rule(base).unlink()
    for stale in backups(base):
        stale.unlink()
    refused = run_installer(base, path=f"{fake_bin}:{os.environ['PATH']}")
    assert refused.returncode != 0 and not rule(base).exists()


def test_uninstall_removes_rule_and_helper_and_keeps_an_edited_rule(base: Path) -> None:
    assert run_installer(base).returncode == 0
    rule(base).write_text(rule(base).read_text() + "# edited on site\n")
    result = run_installer(base, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not rule(base).exists() and not (base / "sbin" / "sekisho-usb-ro").exists()
    [backup] = backups(base)
    assert backup.read_text().endswith("# edited on site\n")
    again = run_installer(base, "--uninstall")
    assert again.returncode == 0 and "not installed" in again.stdout


def test_refuses_a_helper_path_udev_would_split(base: Path) -> None:
    result = run_installer(base, sbin=str(base / "s bin"))
    assert result.returncode != 0 and "blanks" in result.stderr
    assert not rule(base).exists()


# --- the rule under udev's own engine (udevadm test, umockdev, private mount namespace) -----------------


def _udev_unavailable() -> str | None:
    for tool in ("udevadm", "umockdev-run", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install udev umockdev)"
    if os.geteuid() != 0:
        return "needs root for a private mount namespace (unshare -m)"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs tmpfs /mnt"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot mount in a private namespace here: {probe.stderr.strip()}"
    return None


_UDEV_REASON = _udev_unavailable()
if _UDEV_REASON is not None:
    print(f"test_usb_udev: udevadm tests skipped: {_UDEV_REASON}", file=sys.stderr)
needs_udev = pytest.mark.skipif(_UDEV_REASON is not None, reason=_UDEV_REASON or "")

_PCI = "/devices/pci0000:00/0000:00:14.0"
_USB_DISK = f"{_PCI}/usb1/1-2/1-2:1.0/host6/target6:0:0/6:0:0:0/block/sdb"
_SECOND_LUN = f"{_PCI}/usb1/1-2/1-2:1.0/host6/target6:0:0/6:0:0:1/block"
_BEHIND_HUB = f"{_PCI}/usb1/1-3/1-3.4/1-3.4:1.0/host7/target7:0:0/7:0:0:0/block/sdc"
_VIRTIO = "/devices/pci0000:00/0000:00:04.0/virtio1/block/vda"


def _record(path: str, properties: dict[str, str], attributes: dict[str, str] | None = None) -> str:
    lines = [f"P: {path}"]
    if "DEVNAME" in properties:
        lines.append(f"N: {properties['DEVNAME'].removeprefix('/dev/')}")
    lines += [f"E: {key}={value}" for key, value in properties.items()]
    lines += [f"A: {key}={value}" for key, value in (attributes or {}).items()]
    return "\n".join(lines) + "\n"


def _usb_device(path: str, devnum: int, device_class: str = "00") -> str:
    attributes = {"busnum": "1", "devnum": str(devnum), "bDeviceClass": device_class}
    return _record(path, {"SUBSYSTEM": "usb", "DEVTYPE": "usb_device"}, attributes)


def _storage_chain(interface: str, host: int, luns: int) -> list[str]:
    records = [
        _record(interface, {"SUBSYSTEM": "usb", "DEVTYPE": "usb_interface"}, {"bInterfaceClass": "08"}),
        _record(f"{interface}/host{host}", {"SUBSYSTEM": "scsi", "DEVTYPE": "scsi_host"}),
        _record(f"{interface}/host{host}/target{host}:0:0", {"SUBSYSTEM": "scsi", "DEVTYPE": "scsi_target"}),
    ]
    target = f"{interface}/host{host}/target{host}:0:0"
    records += [
        _record(f"{target}/{host}:0:0:{lun}", {"SUBSYSTEM": "scsi", "DEVTYPE": "scsi_device"}) for lun in range(luns)
    ]
    return records


def _disk(path: str, major: int, minor: int, devtype: str = "disk") -> str:
    name = path.rsplit("/", 1)[1]
    properties = {"SUBSYSTEM": "block", "DEVTYPE": devtype, "DEVNAME": f"/dev/{name}"}
    properties |= {"MAJOR": str(major), "MINOR": str(minor)}
    return _record(path, properties, {"ro": "0", "size": "16384"})


def _tree(loop_name: str) -> str:
    """A USB stick (LUN 0: sdb and sdb1; LUN 1: named like a real loop device), a stick behind a hub, a virtio disk."""
    records = [
        _record(_PCI, {"SUBSYSTEM": "pci"}),
        _usb_device(f"{_PCI}/usb1", 1, "09"),
        _usb_device(f"{_PCI}/usb1/1-2", 7),
        *_storage_chain(f"{_PCI}/usb1/1-2/1-2:1.0", 6, 2),
        _disk(_USB_DISK, 8, 16),
        _disk(f"{_USB_DISK}/sdb1", 8, 17, "partition"),
        _disk(f"{_SECOND_LUN}/{loop_name}", 7, int(loop_name.removeprefix("loop"))),
        _usb_device(f"{_PCI}/usb1/1-3", 3, "09"),
        _usb_device(f"{_PCI}/usb1/1-3/1-3.4", 9),
        *_storage_chain(f"{_PCI}/usb1/1-3/1-3.4/1-3.4:1.0", 7, 1),
        _disk(_BEHIND_HUB, 8, 32),
        _record("/devices/pci0000:00/0000:00:04.0", {"SUBSYSTEM": "pci"}),
        _record("/devices/pci0000:00/0000:00:04.0/virtio1", {"SUBSYSTEM": "virtio"}),
        _disk(_VIRTIO, 254, 0),
    ]
    return "\n".join(records)


# Inside the namespace: empty tmpfs over every rules folder, /run and /dev (udevadm test writes its
# database and /dev/block symlinks), our rule alone in /etc/udev/rules.d, then udevadm test on a mock.
_NAMESPACE_SCRIPT = """
set -e
mount --make-rprivate /
for dir in $MASK_DIRS /run /dev; do mount -t tmpfs tmpfs "$dir"; done
mknod -m 666 /dev/null c 1 3
cp "$RULE_FILE" /etc/udev/rules.d/
exec umockdev-run -d "$TREE" -- udevadm test --action="$ACTION" "/sys$SYSPATH"
"""


def _rules_folders() -> list[str]:
    candidates = ["/etc/udev/rules.d", "/usr/local/lib/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d"]
    found: dict[str, None] = {}
    for folder in candidates:
        if os.path.isdir(folder):
            found[os.path.realpath(folder)] = None
    return list(found)


def udevadm_test(rule_file: Path, tree: Path, syspath: str, action: str = "add") -> tuple[list[list[str]], str]:
    """Return (the commands udev would RUN, udevadm's whole output) for one event on a mocked device."""
    env = {
        **os.environ,
        "MASK_DIRS": " ".join(_rules_folders()),
        "RULE_FILE": str(rule_file),
        "TREE": str(tree),
        "ACTION": action,
        "SYSPATH": syspath,
    }
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", _NAMESPACE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    commands = [m.group(1).split(" ") for m in re.finditer(r"^run: '(.*)'$", run.stdout, re.MULTILINE)]
    return commands, output


def parse_problems(output: str, rule_file: Path) -> list[str]:
    """Lines in which udev's parser speaks about the rule file itself (traces are prefixed with the device)."""
    name = f"/etc/udev/rules.d/{rule_file.name}"
    assert f"Reading rules file: {name}" in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith(name)]


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The rule and helper as install-udev.sh writes them (temp folders); returns the base folder."""
    (tmp_path / "rules.d").mkdir()
    result = run_installer(tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    path = tmp_path / "tree.umockdev"
    path.write_text(_tree("loop7"))
    return path


@needs_udev
def test_udev_parses_the_rule_without_a_complaint(installed: Path, tree: Path) -> None:
    _, output = udevadm_test(rule(installed), tree, _USB_DISK)
    assert parse_problems(output, rule(installed)) == []


@needs_udev
def test_a_broken_rule_would_be_caught(installed: Path, tree: Path) -> None:
    # The check above is only worth something if udev speaks up about a bad line: it does.
    broken = installed / "broken" / RULE_NAME
    broken.parent.mkdir()
    text = rule(installed).read_text().replace('ATTRS{busnum}=="?*"', 'ATTRS{busnum}="?*"')
    broken.write_text(text + 'FOO=="bar"\n')
    _, output = udevadm_test(broken, tree, _USB_DISK)
    problems = parse_problems(output, broken)
    assert any("Invalid operator for ATTRS" in line for line in problems), problems
    assert any("Invalid key 'FOO'" in line for line in problems), problems


@needs_udev
@pytest.mark.parametrize(
    ("syspath", "action", "expected"),
    [
        (_USB_DISK, "add", ["/dev/sdb", "1-2", "1", "7"]),
        (f"{_USB_DISK}/sdb1", "add", ["/dev/sdb1", "1-2", "1", "7"]),
        (_USB_DISK, "change", ["/dev/sdb", "1-2", "1", "7"]),
        (_BEHIND_HUB, "add", ["/dev/sdc", "1-3.4", "1", "9"]),
        (_USB_DISK, "remove", None),
        (_VIRTIO, "add", None),
        (f"{_PCI}/usb1/1-2", "add", None),
    ],
    ids=["usb-disk", "partition", "change", "behind-hub", "remove", "virtio-disk", "usb-device-itself"],
)
def test_udev_runs_the_helper_for_usb_disks_only(
    installed: Path, tree: Path, syspath: str, action: str, expected: list[str] | None
) -> None:
    commands, output = udevadm_test(rule(installed), tree, syspath, action)
    helper = str(installed / "sbin" / "sekisho-usb-ro")
    if expected is None:
        assert commands == [], output[-2000:]
    else:
        assert commands == [[helper, *expected]], output[-2000:]


# --- udev's command run against a real disk --------------------------------------------------------------

_LOOP_REASON = skip_reason_printed("test_usb_udev")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Path]:
    if _LOOP_REASON is not None:
        pytest.skip(_LOOP_REASON)
    with loop_device(tmp_path) as device:
        yield device


def _read_only(device: Path) -> bool:
    return Path(f"/sys/block/{device.name}/ro").read_text().strip() == "1"


def _write_fails(device: Path) -> bool:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"\x00" * 4096, 0)
        os.fsync(fd)
    except OSError as err:
        assert err.errno in (errno.EPERM, errno.EROFS)
        return True
    finally:
        os.close(fd)
    return False


@needs_udev
def test_the_command_udev_builds_makes_a_real_disk_read_only_unless_this_plug_is_granted(
    installed: Path, tmp_path: Path, loop: Path
) -> None:
    tree = tmp_path / "loop-tree.umockdev"
    tree.write_text(_tree(loop.name))
    [command], output = udevadm_test(rule(installed), tree, f"{_SECOND_LUN}/{loop.name}")
    assert command[1:] == [str(loop), "1-2", "1", "7"], output[-2000:]

    def udev_runs() -> None:
        subprocess.run(command, check=True, timeout=30)

    # No grant: the disk is read-only before anyone else hears of it; the kernel refuses writes.
    udev_runs()
    assert _read_only(loop) and _write_fails(loop)

    # The agent's driver grants this plug (bus 1, device 7) before authorising a read-write loan.
    usb_root = tmp_path / "sys-usb"
    (usb_root / "1-2").mkdir(parents=True)
    (usb_root / "1-2" / "busnum").write_text("1\n")
    (usb_root / "1-2" / "devnum").write_text("7\n")
    control = IoctlBlockDevices(usb_root=usb_root, grant_dir=installed / "grants")
    block = BlockDevice(loop.name, Path("/sys/block") / loop.name)
    assert control.set_read_write(block)  # the guard's lift (BLKROSET 0), to start the next step afresh
    control.grant_writes("1-2")
    assert (installed / "grants" / "1-2").read_text() == "1 7\n"
    udev_runs()
    assert not _read_only(loop) and not _write_fails(loop)

    # A grant for another plug in that port (device number 8) does not cover this one (7).
    (usb_root / "1-2" / "devnum").write_text("8\n")
    control.grant_writes("1-2")
    udev_runs()
    assert _read_only(loop)

    # The grant withdrawn (loan ended): read-only again at the next event.
    assert control.set_read_write(block)
    control.revoke_writes("1-2")
    udev_runs()
    assert _read_only(loop)


def test_odd_arguments_end_in_read_only(installed: Path, loop: Path) -> None:
    helper = installed / "sbin" / "sekisho-usb-ro"
    grants = installed / "grants"
    grants.mkdir()
    (grants / "1-2").write_text("1 7\n")
    (installed / "escape").write_text("1 7\n")
    for usb, busnum, devnum in [
        ("../escape", "1", "7"),
        ("1-2/../../escape", "1", "7"),
        ("1-2", "", "7"),
        ("", "1", "7"),
    ]:
        subprocess.run(["blockdev", "--setrw", str(loop)], check=True, timeout=30)
        subprocess.run([str(helper), str(loop), usb, busnum, devnum], check=True, timeout=30)
        assert _read_only(loop), (usb, busnum, devnum)
    missing = subprocess.run([str(helper)], capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 2 and "no device node" in missing.stderr
