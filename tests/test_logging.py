"""Logs (issue 11, item 7): JSON lines, journald's native protocol on a real Unix datagram socket, the door
agent's grant/deny decisions in them (never a card number or a PIN), and the --log-format options.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from test_doors_access import Rig, card_hash, make_policy

from sekisho.common.logs import setup_logging

DOOR_LOGGER = "sekisho.agents.doors.service"


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """Leave the root logger as pytest had it (setup_logging replaces only its own handler)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_parse_with_offset_time_fields_and_redacted_secrets(restore_root_logging: None) -> None:
    out = io.StringIO()
    assert setup_logging("INFO", "json", stream=out) == "json"
    log = logging.getLogger("sekisho.test.json")
    log.info("複数行\nmessage %s", "ok", extra={"fields": {"door": "d-1", "pin": "1234", "api_token": "t" * 30}})
    log.debug("not at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = json_lines(out)
    assert set(first) == {"time", "level", "logger", "message", "fields"}
    assert datetime.fromisoformat(first["time"]).utcoffset() is not None
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "sekisho.test.json", "複数行\nmessage ok")
    assert first["fields"] == {"door": "d-1", "pin": "[redacted]", "api_token": "[redacted]"}
    assert "1234" not in out.getvalue() and "t" * 30 not in out.getvalue()
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_door_decisions_are_logged_without_card_or_pin(tmp_path: Path, restore_root_logging: None) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    rig = Rig(tmp_path, make_policy())
    try:
        rig.tap("r-vis", "aoki")  # granted
        rig.tap("r-vis", "stranger")  # denied: unknown card
    finally:
        rig.ctl.close()
    decisions = [line for line in json_lines(out) if line["logger"] == DOOR_LOGGER and "decision" in line["fields"]]
    assert [d["fields"] for d in decisions] == [
        {
            "decision": "granted",
            "door": "visit-door",
            "reader": "r-vis",
            "person": "p-aoki",
            "reason": "doors.visit-door.allowed",
            "recorded": True,
        },
        {
            "decision": "denied",
            "door": "visit-door",
            "reader": "r-vis",
            "person": None,
            "reason": "unknown_card",
            "recorded": True,
        },
    ]
    text = out.getvalue()
    # Neither the keyed card hashes nor the masked numbers reach the log.
    assert card_hash("aoki") not in text and card_hash("stranger") not in text and "****-AOKI" not in text


def parse_journal(datagram: bytes) -> dict[str, str]:
    """Decode journald's native protocol: KEY=value lines, or KEY, newline, 64-bit LE length, value, newline."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, sep, tail = rest.partition(b"\n")
        assert sep, "every field ends in a newline"
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = tail
        else:
            (size,) = struct.unpack("<Q", tail[:8])
            fields[line.decode()] = tail[8 : 8 + size].decode()
            assert tail[8 + size : 9 + size] == b"\n"
            rest = tail[9 + size :]
    return fields


def test_journald_native_protocol_on_a_real_socket(tmp_path: Path, restore_root_logging: None) -> None:
    path = tmp_path / "journal.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        assert setup_logging("INFO", "journald", identifier="sekisho-agent", journal_socket=path) == "journald"
        rig = Rig(tmp_path / "door", make_policy())
        try:
            rig.tap("r-vis", "aoki")
        finally:
            rig.ctl.close()
        logging.getLogger("sekisho.test.journal").warning("line one\nline two", extra={"fields": {"pin": "9999"}})
        received = []
        while True:
            fields = parse_journal(server.recv(65536))
            received.append(fields)
            if fields["LOGGER"] == "sekisho.test.journal":
                break
    finally:
        server.close()
    [grant] = [f for f in received if f.get("SEKISHO_DECISION") == "granted"]
    assert grant["SYSLOG_IDENTIFIER"] == "sekisho-agent" and grant["PRIORITY"] == "6"
    where = (grant["SEKISHO_DOOR"], grant["SEKISHO_READER"], grant["SEKISHO_PERSON"])
    assert where == ("visit-door", "r-vis", "p-aoki")
    assert grant["MESSAGE"].startswith("door visit-door: access granted for p-aoki")
    assert grant["LOGGER"] == DOOR_LOGGER and grant["CODE_FILE"].endswith("service.py")
    last = received[-1]
    # A message with a newline travels in the length-prefixed form; a secret field is redacted.
    assert last["MESSAGE"] == "line one\nline two" and last["PRIORITY"] == "4"
    assert last["SEKISHO_PIN"] == "[redacted]"


def test_journald_without_its_socket_falls_back_to_text_and_says_so(tmp_path: Path, restore_root_logging: None) -> None:
    out = io.StringIO()
    used = setup_logging("INFO", "journald", stream=out, journal_socket=tmp_path / "no-such-socket")
    assert used == "text"
    assert "journald socket" in out.getvalue() and "no-such-socket" in out.getvalue()
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml", stream=out)


def test_log_format_option_refuses_an_unknown_format(tmp_path: Path) -> None:
    controller = tmp_path / "controller.toml"
    names = ("ca_cert", "tls_cert", "tls_key", "signing_key")
    controller.write_text('profile = "dev"\n' + "".join(f'{n} = "{n}.pem"\n' for n in names))
    for argv in (
        ["agent", "run", "--config", str(tmp_path / "agent.toml"), "--log-format", "xml"],
        ["controller", "serve", "--config", str(controller), "--log-format", "xml"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sekisho", *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 2 and "log format must be one of text, json, journald" in proc.stderr, proc.stderr
