"""The session's own pcscd (sekisho.lab.pcscd) as a fixture; registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from sekisho.lab.pcscd import own_pcscd, pcscd_unavailable


@pytest.fixture(scope="session")
def pcscd() -> Iterator[subprocess.Popen[bytes]]:
    """A pcscd of our own with vpcd's virtual reader; skipped with the reason when impossible here."""
    reason = pcscd_unavailable()
    if reason is not None:
        print(f"PC/SC tier skipped: {reason}")
        pytest.skip(f"PC/SC tier skipped: {reason}")
    try:
        with own_pcscd() as process:
            yield process
    except RuntimeError as err:
        pytest.fail(str(err))
