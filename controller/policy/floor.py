"""The policy version floor: the highest version ever sent to agents, kept beside the database, not in it.

Agents refuse a bundle older than the one they hold (a rollback). A database restored from a backup
forgets every version published after the backup, so without a record outside it the controller would
publish an older number again and every agent would refuse it — and with it any revocation made after the
restore. `sekisho controller restore` reads this floor (with the agents' own reports in their heartbeats)
and re-issues the restored policy above it.

The file lives in the controller's var_dir. A backup of the database does not carry it, and a restore
never lowers it. With several controller hosts each keeps its own; the heartbeats cover the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from sekisho.common.files import write_atomically

log = logging.getLogger(__name__)

FLOOR_NAME = "policy-version-floor.json"
# Policy versions are an INTEGER column (32 bits on PostgreSQL): a floor beyond that is not believable.
MAX_VERSION = 2**31 - 1
# A version an agent reports this far above everything else known is not believed: a heartbeat is signed by
# its agent but says what it likes, and following it would push every later version up (toward MAX_VERSION).
MAX_REPORTED_JUMP = 10_000


def floor_path(var_dir: Path) -> Path:
    """Return where the floor of a controller's var_dir is kept."""
    return var_dir / FLOOR_NAME


def read_floor(var_dir: Path) -> int:
    """Return the highest policy version recorded as published (0 if none, or the file is unreadable)."""
    path = floor_path(var_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as err:
        log.warning("policy version floor %s unreadable (%s); treated as 0", path, err)
        return 0
    value = data.get("published_version") if isinstance(data, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_VERSION:
        return value
    log.warning("policy version floor %s holds no valid version; treated as 0", path)
    return 0


@contextlib.contextmanager
def _locked(var_dir: Path) -> Iterator[None]:
    # Several processes (the controller, a CLI publishing at once) may raise it together: highest wins.
    fd = os.open(var_dir / f".{FLOOR_NAME}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def raise_floor(var_dir: Path, version: int) -> int:
    """Record that a version was published; the floor only ever goes up. Return the floor now in force."""
    if not 0 <= version <= MAX_VERSION:
        raise ValueError(f"policy version {version} out of range")
    var_dir.mkdir(parents=True, exist_ok=True)
    with _locked(var_dir):
        current = read_floor(var_dir)
        if version <= current:
            return current
        body = json.dumps({"published_version": version}, sort_keys=True).encode() + b"\n"
        write_atomically(floor_path(var_dir), body)
        return version


def record_published(var_dir: Path, version: int) -> None:
    """Raise the floor before a publication; a failure is logged, never stops the publication itself."""
    try:
        raise_floor(var_dir, version)
    except (OSError, ValueError) as err:
        # Publishing matters more: without the floor a restore still learns the version from heartbeats.
        log.warning("cannot record policy version %d as published in %s: %s", version, floor_path(var_dir), err)


def bundle_versions(bundles: Iterable[bytes]) -> int:
    """Return the highest version among signed bundles as the controller built them (0 if none)."""
    highest = 0
    for raw in bundles:
        version = json.loads(raw)["bundle"]["version"]
        highest = max(highest, int(version))
    return highest
