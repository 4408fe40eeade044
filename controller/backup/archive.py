"""The backup file: a tar holding the database copy and a manifest signed with the controller's key.

The manifest names the copy's SHA-256, so the signature covers the data too. A restore refuses a file
whose manifest does not verify with the controller's public key, whose copy does not match, or that holds
anything else. The file is written 0600: it holds every record of the site.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sekisho.common.files import fsync_dir
from sekisho.common.i18n import _
from sekisho.protocol import errors, signing

FORMAT = 1
MANIFEST = "manifest.json"
# The member holding the database copy, by backend.
DATA_NAMES = {"sqlite": "database.sqlite3", "postgresql": "database.pgdump"}
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1024 * 1024


class BackupError(Exception):
    """A backup cannot be made or read (the message says why; no secret in it)."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """A verified manifest: the fields as signed."""

    fields: dict[str, Any]

    @property
    def backend(self) -> str:
        """Return "sqlite" or "postgresql"."""
        return str(self.fields["backend"])

    @property
    def created_at(self) -> str:
        """Return when the copy was taken (RFC 3339, UTC)."""
        return str(self.fields["created_at"])

    @property
    def schema_revision(self) -> str | None:
        """Return the Alembic revision of the copied database."""
        value = self.fields.get("schema_revision")
        return str(value) if value is not None else None

    @property
    def policy_version(self) -> int:
        """Return the newest policy version in the copy."""
        return int(self.fields.get("policy_version", 0))

    @property
    def tables(self) -> dict[str, int]:
        """Return row counts per table in the copy."""
        return {str(k): int(v) for k, v in self.fields.get("tables", {}).items()}

    @property
    def stream_max_seq(self) -> dict[str, int]:
        """Return each agent's highest stored sequence number in the copy."""
        return {str(k): int(v["max_seq"]) for k, v in self.fields.get("streams", {}).items()}


def file_sha256(path: Path) -> tuple[str, int]:
    """Return the SHA-256 (hex) and size of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_archive(output: Path, fields: dict[str, Any], data: Path, key: Ed25519PrivateKey) -> None:
    """Sign the manifest and write manifest + copy as a tar at output (0600, replaced atomically)."""
    body = {**fields, "format": FORMAT}
    manifest = json.dumps(
        {"manifest": body, "signature": signing.sign(key, "backup", body)}, indent=1, sort_keys=True
    ).encode()
    tmp = output.with_name(f".{output.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w:gz") as tar:
                info = tarfile.TarInfo(MANIFEST)
                info.size = len(manifest)
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(manifest))
                with data.open("rb") as source:
                    info = tarfile.TarInfo(DATA_NAMES[str(fields["backend"])])
                    info.size = data.stat().st_size
                    info.mode = 0o600
                    tar.addfile(info, source)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(output.parent)


def _member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    try:
        info = tar.getmember(name)
    except KeyError as err:
        raise BackupError(_("not a sekisho backup: %(name)s missing", name=name)) from err
    if not info.isfile():
        raise BackupError(_("not a sekisho backup: %(name)s is not a regular file", name=name))
    return info


def read_archive(path: Path, public_key: Ed25519PublicKey, into: Path) -> tuple[Manifest, Path]:
    """Verify a backup's manifest and extract its copy into the folder ``into``; return both.

    Raises BackupError if the file is not a backup, the signature does not verify with the controller's
    public key, the copy does not match the manifest, or anything unexpected is inside.
    """
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the with block below
    except (OSError, tarfile.TarError) as err:
        raise BackupError(_("cannot read %(path)s: %(err)s", path=path, err=err)) from err
    with tar:
        try:
            names = sorted(tar.getnames())
        except (OSError, tarfile.TarError, EOFError) as err:
            raise BackupError(_("cannot read %(path)s: %(err)s", path=path, err=err)) from err
        info = _member(tar, MANIFEST)
        if info.size > _MAX_MANIFEST_BYTES:
            raise BackupError(_("manifest too large"))
        handle = tar.extractfile(info)
        assert handle is not None  # a regular file, checked above
        try:
            doc = json.loads(handle.read())
            body, signature = doc["manifest"], doc["signature"]
            if not isinstance(body, dict) or not isinstance(signature, str):
                raise TypeError("manifest and signature have the wrong types")
        except (ValueError, KeyError, TypeError) as err:
            raise BackupError(_("manifest unreadable: %(err)s", err=err)) from err
        try:
            signing.verify(public_key, "backup", body, signature)
        except errors.Rejected as err:
            raise BackupError(
                _("manifest signature does not verify with the controller's key: not this site's backup, or altered")
            ) from err
        if body.get("format") != FORMAT:
            raise BackupError(
                _(
                    "backup format %(format)s is not supported (this code reads %(supported)s)",
                    format=repr(body.get("format")),
                    supported=FORMAT,
                )
            )
        backend = body.get("backend")
        if backend not in DATA_NAMES:
            raise BackupError(_("unknown backend %(backend)s in the manifest", backend=repr(backend)))
        data_name = DATA_NAMES[backend]
        if names != sorted([MANIFEST, data_name]):
            raise BackupError(_("unexpected members in the backup: %(names)s", names=names))
        info = _member(tar, data_name)
        target = into / data_name
        source = tar.extractfile(info)
        assert source is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
    digest, size = file_sha256(target)
    data = body.get("data", {})
    if data.get("sha256") != digest or data.get("size") != size:
        target.unlink(missing_ok=True)
        raise BackupError(_("the database copy does not match the signed manifest (damaged or altered)"))
    return Manifest(body), target
