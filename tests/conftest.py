"""Shared fixtures: a PKI for the whole session and a real mosquitto per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import init_pki, issue_agent

AGENTS = ("agent-a", "agent-b")
# The command lines speak one language per process, read from the environment once (sekisho.common.i18n):
# pinned here, before any test imports a command line, so in-process and subprocess output is Japanese whatever
# the developer's locale. A test that checks the English sets SEKISHO_LANG=en for its subprocesses.
os.environ["SEKISHO_LANG"] = "ja"
# The shared fixture modules, registered here once: a test module that imports one of them directly (for its
# helpers) would otherwise load it before pytest could rewrite its asserts, and the run would depend on
# which module happened to be collected first.
pytest_plugins = ("agent_fixtures", "pcsc_fixtures", "pipeline_fixtures", "store_fixtures")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI directory with the CA, broker, controller and the agents agent-a and agent-b."""
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory)
    for name in AGENTS:
        issue_agent(directory, name)
    return directory


@pytest.fixture
def broker(pki: Path, tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto with the project's config and ACL, running for one test on a free loopback port."""
    with Broker(pki, tmp_path / "broker") as running:
        yield running
