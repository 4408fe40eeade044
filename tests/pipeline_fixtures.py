"""Fixture for whole-pipeline tests: a fresh Site with a running broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.site import Site

from sekisho.lab import Lab


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A fresh site: PKI, a running broker, controller.toml (SQLite), nothing else running yet."""
    lab = Lab(tmp_path / "site")
    lab.start_broker()
    lab.write_controller_config()
    site = Site(lab)
    try:
        yield site
    finally:
        site.close()
        lab.stop_all()
