"""`sekisho cards enrol` with a real pcscd and a software PIV card in vpcd's reader: the keyed UID hash and the
card's public key land in site.yaml, the raw UID nowhere, and the login check then accepts the card."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

if importlib.util.find_spec("smartcard") is None:
    _REASON = "PC/SC tier skipped: pyscard is not installed (pip install -e '.[agent]')"
    print(_REASON)
    pytest.skip(_REASON, allow_module_level=True)

from sekisho.agents.runtime.cards import enrolled_cards
from sekisho.cli import app
from sekisho.controller.policy.loader import parse_policy
from sekisho.drivers.smartcard import authenticate
from sekisho.drivers.smartcard.pcsc import PcscBackend
from sekisho.firmware_stubs.piv_card import VirtualCard
from sekisho.lab.pcscd import VPCD_READER

DEMO_POLICY = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
SITE_KEY = b"enrol-site-key-0123456789abcdef!"
UID = bytes.fromhex("04C0FFEE123456")
runner = CliRunner()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the demo site.yaml and a site key file."""
    policy = tmp_path / "site.yaml"
    shutil.copyfile(DEMO_POLICY, policy)
    key = tmp_path / "site.key"
    key.write_bytes(SITE_KEY + b"\n")
    return policy, key


@pytest.fixture
def card(pcscd: subprocess.Popen[bytes]) -> Iterator[VirtualCard]:
    """A software PIV card with its own P-256 key, inserted in vpcd's reader."""
    virtual = VirtualCard(uid=UID, key=ec.generate_private_key(ec.SECP256R1()))
    virtual.insert()
    try:
        yield virtual
    finally:
        virtual.remove()


def enrol(*args: str) -> tuple[int, str]:
    """Run `sekisho cards enrol ARGS`; return its exit code and its whole output."""
    result = runner.invoke(app, ["cards", "enrol", "--reader", VPCD_READER, "--wait", "10", *args])
    return result.exit_code, result.output


def test_enrol_writes_the_keyed_hash_and_public_key_and_never_the_uid(
    files: tuple[Path, Path], card: VirtualCard
) -> None:
    policy, key = files
    code, out = enrol("--person", "p-0006", "--site-key", str(key), "--policy", str(policy))
    assert code == 0, out
    expected_hash = hmac.new(SITE_KEY, UID, hashlib.sha256).hexdigest()
    pem = (
        card.key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert "p-0006 のカード c-0006-2 を追加しました" in out  # the process language (tests: ja)
    assert f"site key id: {hmac.new(SITE_KEY, b'sekisho/site-key-id', hashlib.sha256).hexdigest()[:16]}" in out
    written = policy.read_text()
    for raw in (UID.hex(), UID.hex().upper()):
        assert raw not in out and raw not in written
    (entry,) = [c for c in yaml.safe_load(written)["cards"] if c["id"] == "c-0006-2"]
    expected = {"id": "c-0006-2", "person": "p-0006", "kind": "piv", "uid_hash": expected_hash, "public_key_pem": pem}
    assert entry == expected
    assert (policy.parent / "site.yaml.bak").read_text() == DEMO_POLICY.read_text()

    # The login check, on the same real reader, accepts this card against the policy just written.
    site = parse_policy(written)
    with PcscBackend() as backend, contextlib.closing(backend.connect(VPCD_READER)) as conn:
        result = authenticate(conn, enrolled_cards(site.cards), site_key=SITE_KEY)
    assert result.ok and result.card_id == "c-0006-2"

    # Enrolling again updates the same entry (a re-issued card of the same person replaces the old one).
    code, out = enrol("--person", "p-0006", "--site-key", str(key), "--policy", str(policy))
    assert code == 0 and "p-0006 のカード c-0006-2 を更新しました" in out
    assert [c["id"] for c in yaml.safe_load(policy.read_text())["cards"]].count("c-0006-2") == 1


def test_without_a_policy_it_prints_the_entry(files: tuple[Path, Path], card: VirtualCard) -> None:
    _, key = files
    code, out = enrol("--person", "p-0006", "--site-key", str(key))
    assert code == 0, out
    assert hmac.new(SITE_KEY, UID, hashlib.sha256).hexdigest() in out and "BEGIN PUBLIC KEY" in out
    assert UID.hex() not in out.lower()


def test_a_card_enrolled_to_someone_else_or_an_unknown_person_is_refused(
    files: tuple[Path, Path], card: VirtualCard
) -> None:
    policy, key = files
    assert enrol("--person", "p-0006", "--site-key", str(key), "--policy", str(policy))[0] == 0
    before = policy.read_text()
    code, out = enrol("--person", "p-0002", "--site-key", str(key), "--policy", str(policy))
    assert code == 1 and "already enrolled as 'c-0006-2'" in out
    code, out = enrol("--person", "p-9999", "--site-key", str(key), "--policy", str(policy))
    assert code == 1 and "p-9999" in out and "not in site.yaml" in out
    code, out = enrol("--person", "p-0002", "--site-key", str(key), "--policy", str(policy), "--card-id", "c-0001")
    assert code == 1 and "belongs to 'p-0001'" in out
    assert policy.read_text() == before


def test_no_card_and_no_reader_are_clear_errors(files: tuple[Path, Path], pcscd: subprocess.Popen[bytes]) -> None:
    _, key = files
    result = runner.invoke(
        app, ["cards", "enrol", "--reader", VPCD_READER, "--wait", "1", "--person", "p-0006", "--site-key", str(key)]
    )
    assert result.exit_code == 1 and "1 秒以内にカードを読めません" in result.output
    result = runner.invoke(
        app, ["cards", "enrol", "--reader", "No Such Reader", "--person", "p-0006", "--site-key", str(key)]
    )
    assert result.exit_code == 2 and "リーダー 'No Such Reader' がありません" in result.output
