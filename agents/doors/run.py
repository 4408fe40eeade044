"""Run a door agent from ``doors.toml`` beside agent.toml: which readers and which lock board it drives.

``sekisho-agent doors --config /etc/sekisho/agent.toml`` is what a door box runs as a service.
doors.toml (unknown keys are an error; must not be writable by group or others)::

    site_key_file = "site.key"          # keys card numbers the same way the policy's uid_hash does
    pcsc_card_timeout_s = 3.0           # a PC/SC card's whole check; past it the tap is refused card_timeout
    pcsc_apdu_timeout_s = 1.5           # a PC/SC card's answer to any one command
    osdp_card_reads_per_s = 4.0         # an OSDP reader's card reads beyond this rate are dropped (reader_flood)
    osdp_card_read_burst = 8            # ... after a burst of this many

    [board]                             # the lock relays, door sensors, key slots and tamper input
    kind = "serial"                     # "serial" (docs/locker-board-protocol.md), "hid_relay", "simulated" (lab)
    device = "/dev/ttyUSB0"
    relays = 4
    doors = 4
    key_slots = 8

    [[osdp]]                            # one OSDP line (RS-485 through a serial adapter)
    device = "/dev/ttyS1"
    readers = [{reader_id = "rdr-hr-in", address = 1, scbk_file = "keys/rdr-hr-in.scbk"}]

    [[pcsc]]                            # a PC/SC reader serving a door
    reader_id = "rdr-locker-01"
    pcsc_reader = "ACS ACR122U 00 00"
"""

from __future__ import annotations

import logging
import signal
import stat
import threading
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sekisho.agents.doors.attach import (
    DOOR_APDU_TIMEOUT_S,
    DOOR_CARD_TIMEOUT_S,
    AttachedDoors,
    PcscDoorReaders,
    attach_doors,
    policy_provider,
)
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.lab_mode import lab_mode, simulation_refused
from sekisho.common.sdnotify import serve_until
from sekisho.drivers.locker import BoardError, LockIO
from sekisho.drivers.osdp import OsdpError, ReaderConfig, ReaderLink
from sekisho.drivers.osdp.flood import DEFAULT_READ_BURST, DEFAULT_READS_PER_S
from sekisho.protocol.policy import Card

log = logging.getLogger(__name__)

DOORS_SETTINGS_NAME = "doors.toml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BoardSettings(_Model):
    """The lock board this agent drives."""

    kind: Literal["serial", "hid_relay", "simulated"] = "serial"
    device: str | None = None
    relays: int = Field(default=4, ge=1, le=64)
    doors: int = Field(default=4, ge=0, le=64)
    key_slots: int = Field(default=0, ge=0, le=255)
    hid_serial: str | None = Field(default=None, max_length=16, description="HID relay board serial (hid_relay)")


class OsdpReaderSettings(_Model):
    """One OSDP reader on a line."""

    reader_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    address: int = Field(ge=0, le=126)
    scbk_file: Path | None = Field(default=None, description="16-byte Secure Channel key (hex); None: not keyed")
    install_mode: bool = False


class OsdpLineSettings(_Model):
    """One OSDP line and the readers on it."""

    device: str
    baud_rate: int = 115200
    readers: list[OsdpReaderSettings] = Field(min_length=1)


class PcscReaderSettings(_Model):
    """A PC/SC reader serving a door."""

    reader_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    pcsc_reader: str


class DoorsSettings(_Model):
    """``doors.toml``."""

    site_key_file: Path
    board: BoardSettings = Field(default_factory=BoardSettings)
    osdp: list[OsdpLineSettings] = Field(default_factory=list)
    pcsc: list[PcscReaderSettings] = Field(default_factory=list)
    pcsc_card_timeout_s: float = Field(default=DOOR_CARD_TIMEOUT_S, gt=0, le=30)
    pcsc_apdu_timeout_s: float = Field(default=DOOR_APDU_TIMEOUT_S, gt=0, le=30)
    osdp_card_reads_per_s: float = Field(default=DEFAULT_READS_PER_S, ge=0.2, le=1000)
    osdp_card_read_burst: int = Field(default=DEFAULT_READ_BURST, ge=1, le=1000)
    tick_s: float = Field(default=0.05, gt=0, le=0.5)


class DoorsSetupError(Exception):
    """doors.toml is missing, unsafe or invalid, or a device it names cannot be opened."""


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


def load_doors_settings(agent_toml: Path) -> tuple[DoorsSettings, Path]:
    """Load doors.toml beside the agent TOML; return it with the directory relative paths resolve against."""
    path = agent_toml.resolve().parent / DOORS_SETTINGS_NAME
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise DoorsSetupError(f"{path}: {err.strerror}") from err
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DoorsSetupError(f"{path} is writable by group or others; refusing it")
    try:
        return DoorsSettings(**tomllib.loads(path.read_text())), path.parent
    except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as err:
        raise DoorsSetupError(f"invalid {path}: {err}") from err


def _read_key(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as err:
        raise DoorsSetupError(f"secure channel key {path}: {err}") from err


def build_readers(settings: DoorsSettings, base: Path) -> list[ReaderLink]:
    """Open one OSDP link per configured line (libosdp as control panel)."""
    from sekisho.drivers.osdp import OsdpReaderLink

    links: list[ReaderLink] = []
    for line in settings.osdp:
        configs = [
            ReaderConfig(
                reader_id=r.reader_id,
                address=r.address,
                scbk=_read_key(_resolve(base, r.scbk_file)) if r.scbk_file else None,
                install_mode=r.install_mode,
            )
            for r in line.readers
        ]
        links.append(
            OsdpReaderLink(
                line.device,
                configs,
                baud_rate=line.baud_rate,
                card_reads_per_s=settings.osdp_card_reads_per_s,
                card_read_burst=settings.osdp_card_read_burst,
            )
        )
    return links


def build_board(settings: BoardSettings) -> LockIO:
    """Open the configured lock board (a simulated one only in lab mode: agents/runtime/lab_mode.py)."""
    if settings.kind == "simulated":
        if not lab_mode():
            raise DoorsSetupError(simulation_refused('doors.toml board.kind = "simulated"'))
        from sekisho.drivers.locker import SimulatedLockerBoard

        return SimulatedLockerBoard(relays=settings.relays, doors=settings.doors, key_slots=settings.key_slots)
    if settings.kind == "hid_relay":
        from sekisho.drivers.relay.hid import HidRelayBoard

        return HidRelayBoard(serial=settings.hid_serial)
    if settings.device is None:
        raise DoorsSetupError("board.device is required for a serial locker board")
    from sekisho.drivers.locker import LockerBoardLink

    return LockerBoardLink(settings.device, relays=settings.relays, doors=settings.doors, key_slots=settings.key_slots)


def start_doors(agent: Agent, config_path: Path) -> AttachedDoors:
    """Build everything doors.toml names on a constructed agent, start the agent, then the doors."""
    settings, base = load_doors_settings(config_path)
    if settings.board.kind == "simulated" and not lab_mode():
        # Before any device is opened: nothing of a refused configuration runs.
        raise DoorsSetupError(simulation_refused('doors.toml board.kind = "simulated"'))
    try:
        site_key = _resolve(base, settings.site_key_file).read_bytes().strip()
    except OSError as err:
        raise DoorsSetupError(f"site_key_file: {err}") from err
    pcsc = None
    if settings.pcsc:
        from sekisho.drivers.smartcard import pcsc_backend

        provider = policy_provider(agent.policy)

        def cards() -> list[Card]:
            policy = provider()[0]
            return list(policy.cards) if policy is not None else []

        pcsc = PcscDoorReaders(
            pcsc_backend(),
            {r.pcsc_reader: r.reader_id for r in settings.pcsc},
            site_key=site_key,
            cards=cards,
            card_timeout_s=settings.pcsc_card_timeout_s,
            apdu_timeout_s=settings.pcsc_apdu_timeout_s,
        )
    try:
        readers = build_readers(settings, base)
        board = build_board(settings.board)
    except (BoardError, OsdpError, OSError, ValueError) as err:
        raise DoorsSetupError(f"door devices: {type(err).__name__}: {err}") from err
    agent.describe("door")
    doors = attach_doors(
        emit=agent.emit,
        policy=agent.policy,
        state_dir=agent.config.state_dir,
        readers=readers,
        board=board,
        site_key=site_key,
        pcsc=pcsc,
        commands=agent.commands,
        tick_s=settings.tick_s,
    )
    agent.start()
    try:
        doors.start()
    except (BoardError, OsdpError, OSError) as err:
        # A reader line or board that cannot be opened is a set-up error: say which, leave nothing running.
        doors.stop()
        raise DoorsSetupError(f"door devices: {type(err).__name__}: {err}") from err
    return doors


def run_doors(agent: Agent, config_path: Path) -> None:
    """Run a door agent until SIGINT or SIGTERM."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    doors = start_doors(agent, config_path)
    try:
        # Ready once the readers and the board are open: doors decide from the cached policy without the broker.
        serve_until(stop, alive=lambda: agent.alive() and doors.running, status=agent.service_status)
    finally:
        doors.stop()
        agent.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
