#!/usr/bin/env python3
"""Third-party static files of the console, fetched at set-up from the npm registry and hash-checked.

    python requirements/assets.py fetch [--from TARBALL] [--pins FILE] [--root DIR]
    python requirements/assets.py check [--pins FILE] [--root DIR]

requirements/assets.json pins each asset: its registry tarball and the tarball's Subresource Integrity
hash (sha512, as the registry's `dist.integrity` states it). `fetch` downloads the tarball (or reads one
given with --from, for a controller without internet), refuses it unless the hash matches, and writes the
pinned members to their git-ignored places, then a stamp; it does nothing when the stamp and the files
already match the pin. Nothing is fetched at run time and nothing from a CDN. Standard library only: it runs
before the venv exists.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "requirements" / "assets.json"
MAX_TARBALL = 16 * 1024 * 1024
MAX_MEMBER = 4 * 1024 * 1024
TIMEOUT_S = 60
STAMP = ".assets-stamp.json"


class AssetError(Exception):
    """A tarball that does not match its pin, or a pin that cannot be satisfied."""


def integrity_of(data: bytes) -> str:
    """Return the SRI string (sha512-<base64>) of some bytes, as npm's dist.integrity writes it."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def load_pins(path: Path) -> dict[str, dict[str, object]]:
    """Read the pin file; each asset needs a tarball URL, a sha512 integrity and the files to extract."""
    pins: dict[str, dict[str, object]] = json.loads(path.read_text(encoding="utf-8"))
    for name, pin in pins.items():
        integrity = pin.get("integrity")
        if not isinstance(integrity, str) or not integrity.startswith("sha512-"):
            raise AssetError(f"{name}: integrity must be a sha512 SRI string")
        tarball = pin.get("tarball")
        if not isinstance(tarball, str) or not tarball.startswith("https://registry.npmjs.org/"):
            raise AssetError(f"{name}: tarball must be an https URL of the npm registry")
        if not isinstance(pin.get("files"), dict) or not pin["files"]:
            raise AssetError(f"{name}: files to extract are missing")
    return pins


def _download(url: str) -> bytes:
    # load_pins allowed only https URLs of the npm registry: no file: or other scheme gets here.
    request = urllib.request.Request(url, headers={"User-Agent": "sekisho-assets"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310
        data: bytes = answer.read(MAX_TARBALL + 1)
    if len(data) > MAX_TARBALL:
        raise AssetError(f"{url}: larger than {MAX_TARBALL} bytes")
    return data


def _stamp(pin: dict[str, object], contents: dict[str, bytes]) -> dict[str, object]:
    return {
        "version": pin.get("version"),
        "integrity": pin["integrity"],
        "files": {target: hashlib.sha256(data).hexdigest() for target, data in sorted(contents.items())},
    }


def _stamp_path(root: Path, pin: dict[str, object]) -> Path:
    files = pin["files"]
    assert isinstance(files, dict)
    first = Path(str(next(iter(files.values()))))
    return root / first.parent / f"{first.stem.split('.')[0]}{STAMP}"


def is_current(root: Path, pin: dict[str, object]) -> bool:
    """Tell whether the extracted files are there, unchanged, and from the pinned tarball."""
    try:
        stamp = json.loads(_stamp_path(root, pin).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if stamp.get("integrity") != pin["integrity"]:
        return False
    files = pin["files"]
    assert isinstance(files, dict)
    for target in files.values():
        path = root / str(target)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return False
        if stamp.get("files", {}).get(str(target)) != digest:
            return False
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_from(data: bytes, pin: dict[str, object], root: Path) -> list[Path]:
    """Check a tarball against its pin and write the pinned members; nothing is written when it does not match."""
    got = integrity_of(data)
    if got != pin["integrity"]:
        raise AssetError(f"integrity mismatch: expected {pin['integrity']}, got {got}; nothing written")
    files = pin["files"]
    assert isinstance(files, dict)
    contents: dict[str, bytes] = {}
    # Only the named regular members are read (never extractall): a path in the archive decides nothing.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member_name, target in files.items():
            try:
                member = archive.getmember(member_name)
            except KeyError as err:
                raise AssetError(f"{member_name} is not in the tarball") from err
            if not member.isfile() or member.size > MAX_MEMBER:
                raise AssetError(f"{member_name} is not a regular file of at most {MAX_MEMBER} bytes")
            handle = archive.extractfile(member)
            assert handle is not None
            contents[str(target)] = handle.read()
    written = []
    for target, content in contents.items():
        _write_atomic(root / target, content)
        written.append(root / target)
    _write_atomic(_stamp_path(root, pin), json.dumps(_stamp(pin, contents), indent=2).encode() + b"\n")
    return written


def fetch(pins: dict[str, dict[str, object]], root: Path, local: Path | None) -> int:
    """Fetch (or read) each pinned tarball that is not current, verify it and extract its files."""
    for name, pin in pins.items():
        if local is None and is_current(root, pin):
            continue
        source = str(local) if local is not None else str(pin["tarball"])
        print(f"assets: {name} {pin.get('version')} from {source}")
        try:
            data = local.read_bytes() if local is not None else _download(str(pin["tarball"]))
            for path in install_from(data, pin, root):
                print(f"assets: wrote {path.relative_to(root)}")
        except (AssetError, OSError, tarfile.TarError) as err:
            print(f"assets: {name}: {err}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(description="Fetch and verify the console's third-party static files.")
    parser.add_argument("command", choices=("fetch", "check"))
    parser.add_argument("--from", dest="local", type=Path, help="a tarball already downloaded (offline set-up)")
    parser.add_argument("--pins", type=Path, default=PINS)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    try:
        pins = load_pins(args.pins)
    except (AssetError, OSError, ValueError) as err:
        print(f"assets: {args.pins}: {err}", file=sys.stderr)
        return 2
    if args.command == "check":
        stale = [name for name, pin in pins.items() if not is_current(args.root, pin)]
        for name in stale:
            print(f"assets: {name} missing or not as pinned; run: requirements/assets.py fetch", file=sys.stderr)
        return 1 if stale else 0
    if args.local is not None and len(pins) != 1:
        print("assets: --from needs a pin file with one asset", file=sys.stderr)
        return 2
    return fetch(pins, args.root, args.local)


if __name__ == "__main__":
    raise SystemExit(main())
