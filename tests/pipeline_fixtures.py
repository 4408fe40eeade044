"""Fixture for whole-pipeline tests: a fresh Site with a running broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.lab import lab_on
from support.site import Site


@pytest.fixture
def site(pki: Path, tmp_path: Path) -> Iterator[Site]:
    """A fresh site: a copy of the session PKI, a running broker, controller.toml (SQLite), nothing else running."""
    lab = lab_on(pki, tmp_path / "site")
    lab.start_broker()
    lab.write_controller_config()
    site = Site(lab)
    try:
        yield site
    finally:
        site.close()
        lab.stop_all()
