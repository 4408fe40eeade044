"""No door lets a My Number into the controller (issue 10, items 4, 6 and 7).

Each door is driven through its real code path (the HTTP API through TestClient on a SQLite store, the CLI
through typer's runner, policy through the real loader, ingest through the real worker's process()), and
each test checks both that the value is refused without being repeated and that no byte of the database
files holds it in any of its forms. Valid numbers are computed at test time (test_mynumber.valid).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import event, inspect, select, text
from support.lab import lab_on
from test_media import site_yaml
from test_media_api import _loan
from test_mynumber import ZERO_PREFIX, fullwidth, grouped, valid, wrong
from typer.testing import CliRunner

from sekisho.cli import app as sekisho_app
from sekisho.common.i18n import localize
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig, load_config
from sekisho.controller.doors import commands as door_commands
from sekisho.controller.ingest.worker import IngestWorker, _Incoming
from sekisho.controller.media.service import MediaRefused, MediaService
from sekisho.controller.policy.loader import PolicyError, parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.controller.store.models import Agent, DeadLetter
from sekisho.controller.store.redaction import LETTER_MAC_INFO, letter_mac, letter_mac_key
from sekisho.deploy.pki import AgentCredentials
from sekisho.lab import write_toml
from sekisho.lab.pgcluster import pg_database
from sekisho.protocol import canonical, errors, messages, mynumber, signing, timefmt, topics

TOKEN = "t" * 32
NUMBER = valid()
# How an administrator or a hostile agent might write it (see tests/test_mynumber.py for all of them).
NOTATIONS = {
    "plain": NUMBER,
    "ideographic space": grouped("\u3000")(NUMBER),
    "en dash": grouped("\u2013")(NUMBER),
    "prolonged sound mark": grouped("ー")(NUMBER),
    "minus sign": grouped("\u2212")(NUMBER),
    "no-break space": grouped("\u00a0")(NUMBER),
    "space-hyphen-space": grouped(" - ")(NUMBER),
    "dots": grouped(".")(NUMBER),
    "zero-width space": NUMBER[:6] + "\u200b" + NUMBER[6:],
    "full-width with U+3000": fullwidth(grouped("\u3000")(NUMBER)),
    "MN prefix": "MN" + NUMBER,
    "in Japanese text": f"個人番号 {grouped('-')(NUMBER)} の確認",
}


def forms(*texts: str) -> set[bytes]:
    """Every byte string the number (or a text holding it) could be stored as."""
    shapes = {NUMBER, fullwidth(NUMBER), str(int(NUMBER))}
    for sep in (" ", "-", "\u3000", "\u2013", "ー", "\u2212", "\u00a0", " - ", ".", "\u200b"):
        shapes.add(grouped(sep)(NUMBER))
    for text_ in texts:
        shapes |= {text_, json.dumps(text_)[1:-1], json.dumps(text_, ensure_ascii=False)[1:-1]}
    found = {s.encode() for s in shapes}
    found |= {s.encode("utf-16-le") for s in (NUMBER, fullwidth(NUMBER))}
    return found


def database_bytes(database: Path) -> bytes:
    """The database file with its -wal and -shm, as someone with a copy of the disk would read them."""
    return b"".join(p.read_bytes() for p in sorted(database.parent.glob(database.name + "*")) if p.is_file())


def assert_nowhere(database: Path, *texts: str) -> None:
    data = database_bytes(database)
    assert data, database
    for form in forms(*texts):
        assert form not in data, form


def assert_not_repeated(answer: str) -> None:
    assert not mynumber.contains_my_number(answer), answer
    for form in forms(*NOTATIONS.values()):
        assert form.decode("utf-8", "replace") not in answer


# --- HTTP: media loans ------------------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    store: Store
    database: Path


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    database = tmp_path / "controller.db"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    key = signing.generate_key()
    store = Store(engine, signing_key=key)
    (tmp_path / "signing.key").write_bytes(signing.private_key_pem(key))
    PolicyService(store, key).apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test")
    config = ControllerConfig(
        profile="production",
        var_dir=tmp_path,
        ca_cert=tmp_path / "ca.pem",
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "c.key",
        signing_key=tmp_path / "signing.key",
        api_tokens=[SecretStr(TOKEN)],
    )
    client = TestClient(create_app(AppState(config, store, None)), headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        yield Api(client, store, database)
    finally:
        engine.dispose()


@pytest.mark.parametrize("notation", sorted(NOTATIONS))
def test_loan_purpose_with_a_my_number_is_refused_and_not_stored(api: Api, notation: str) -> None:
    answer = api.client.post("/api/v1/media/loans", json=_loan(purpose=NOTATIONS[notation]))
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "purpose"]
    assert "マイナンバー" in answer.text  # the default language of an answer
    assert_not_repeated(answer.text)
    english = api.client.post(
        "/api/v1/media/loans", json=_loan(purpose=NOTATIONS[notation]), headers={"Accept-Language": "en"}
    )
    assert english.json()["detail"][0]["loc"] == ["body", "purpose"] and "looks like a My Number" in english.text
    assert "マイナンバー" not in english.text
    assert_not_repeated(english.text)
    assert api.client.get("/api/v1/media/loans").json() == []
    assert_nowhere(api.database, NOTATIONS[notation])


@pytest.mark.parametrize("field", ["medium", "person", "approved_by", "recorded_by", "terminals"])
def test_every_loan_field_is_checked(api: Api, field: str) -> None:
    value: Any = [NOTATIONS["en dash"]] if field == "terminals" else NOTATIONS["en dash"]
    answer = api.client.post("/api/v1/media/loans", json=_loan(**{field: value}))
    assert answer.status_code == 422, answer.text
    assert_not_repeated(answer.text)
    assert_nowhere(api.database, NOTATIONS["en dash"])


def test_too_long_input_holding_a_my_number_is_not_echoed(api: Api) -> None:
    # Pydantic would put the whole input of a too-long field into the 422; the app redacts it.
    purpose = "x" * 95 + " " + NUMBER
    answer = api.client.post("/api/v1/media/loans", json=_loan(purpose=purpose))
    assert answer.status_code == 422 and "string_too_long" in answer.text
    assert mynumber.REDACTED in answer.text
    assert_not_repeated(answer.text)


def test_revoke_reason_and_return_receiver_are_checked(api: Api) -> None:
    made = api.client.post("/api/v1/media/loans", json=_loan(purpose=f"番号 {wrong()} の確認 (test)"))
    assert made.status_code == 201, made.text  # a wrong check digit is synthetic data, not a My Number
    loan_id = made.json()["loan"]["id"]
    for path, body in [
        (f"/api/v1/media/loans/{loan_id}/revoke", {"reason": f"本人の番号 {NOTATIONS['ideographic space']}"}),
        (f"/api/v1/media/loans/{loan_id}/revoke", {"reason": "x", "revoked_by": NOTATIONS["MN prefix"]}),
        (f"/api/v1/media/loans/{loan_id}/return", {"received_by": NOTATIONS["dots"]}),
    ]:
        answer = api.client.post(path, json=body)
        assert answer.status_code == 422, answer.text
        assert_not_repeated(answer.text)
    assert api.client.get(f"/api/v1/media/loans/{loan_id}").json()["state"] == "on_loan"
    # An id in the path is never repeated either (it would be in "no loan …").
    answer = api.client.post(f"/api/v1/media/loans/{NUMBER}/revoke", json={"reason": "x"})
    assert answer.status_code == 422
    assert_not_repeated(answer.text)
    assert api.client.post(f"/api/v1/media/loans/{loan_id}/revoke", json={"reason": "異動"}).status_code == 200
    assert_nowhere(api.database, *NOTATIONS.values())


def test_the_service_refuses_for_every_caller(api: Api) -> None:
    # The CLI and anything else call MediaService directly: the same check, naming fields only.
    service = MediaService(api.store, PolicyService(api.store, signing.generate_key()))
    with pytest.raises(MediaRefused) as info:
        service.lend(
            "m-0001",
            "p-0001",
            ["t-hr-01"],
            None,
            timefmt.now() + timedelta(days=1),
            NOTATIONS["prolonged sound mark"],
            True,
            "p-0002",
            "tester",
        )
    assert str(info.value).startswith("purpose: ")
    assert_not_repeated(str(info.value))
    with pytest.raises(mynumber.MyNumberFound):
        # The register refuses too, whatever its caller checked.
        service.register.add_loan_version(
            {}, base_version=1, created_by="x", comment="", log={"loan_id": "l", "detail": {"reason": NUMBER}}
        )
    assert_nowhere(api.database)


# --- site.yaml ----------------------------------------------------------------------------------------


def test_site_yaml_with_a_my_number_names_the_field_and_not_the_value() -> None:
    text_ = site_yaml().replace("name: 見本 花子", f"name: 見本 花子 {NOTATIONS['ideographic space']}", 1)
    text_ = text_.replace("name: 人事部 管理区域 扉", "name: 扉 MN" + NUMBER, 1)
    with pytest.raises(PolicyError) as info:
        parse_policy(text_, "site.yaml")
    assert [p.split(": ")[1] for p in info.value.problems] == ["people.1.name", "doors.0.name"]
    assert "マイナンバー" in info.value.problems[0]  # the process language (tests: ja)
    assert "looks like a My Number" in localize(info.value.problems[0], "en")
    assert_not_repeated(" ".join(info.value.problems))
    # As a YAML integer, as a key, and in a line PyYAML quotes in its error.
    for doc in (f"site: {{name: a, id: {NUMBER}}}\n", f"site: {{name: a}}\n{NUMBER}: x\n", f"site: [{NUMBER}\n"):
        with pytest.raises(PolicyError) as info:
            parse_policy(doc, "site.yaml")
        assert_not_repeated(" ".join(info.value.problems))
    assert parse_policy(site_yaml().replace("name: 見本 花子", f"name: 見本 花子 {wrong()}", 1))


def test_the_store_refuses_a_policy_version_holding_one(api: Api) -> None:
    document = parse_policy(site_yaml()).model_dump(mode="json")
    document["people"][0]["name"] = NOTATIONS["no-break space"]
    with pytest.raises(mynumber.MyNumberFound) as info:
        api.store.add_policy_version(document, created_by="x", source_sha256="0" * 64)
    assert info.value.paths == ["$.document.people[0].name"]
    with pytest.raises(mynumber.MyNumberFound):
        api.store.add_policy_version({}, created_by="x", source_sha256="0" * 64, comment=NUMBER)
    assert_nowhere(api.database, NOTATIONS["no-break space"])


# --- CLI: policy apply, media, doors, send-command ---------------------------------------------------


@dataclass
class Cli:
    config: Path
    database: Path
    tmp: Path

    def run(self, *args: str, code: int) -> str:
        result = CliRunner().invoke(sekisho_app, [*args, "--config", str(self.config)], env={"COLUMNS": "250"})
        assert result.exit_code == code, result.output
        assert_not_repeated(result.output)
        return result.output


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    key = signing.generate_key()
    (tmp_path / "signing.key").write_bytes(signing.private_key_pem(key))
    config = write_toml(
        tmp_path / "controller.toml",
        {
            "profile": "dev",
            "var_dir": str(tmp_path / "var"),
            "ca_cert": str(tmp_path / "ca.pem"),
            "tls_cert": str(tmp_path / "c.pem"),
            "tls_key": str(tmp_path / "c.key"),
            "signing_key": str(tmp_path / "signing.key"),
        },
    )
    database = tmp_path / "var" / "controller.db"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    PolicyService(Store(engine), key).apply(parse_policy(site_yaml()), source_sha256="0" * 64, created_by="test")
    engine.dispose()
    yield Cli(config, database, tmp_path)


def test_policy_apply_refuses_a_person_named_with_a_my_number(cli: Cli) -> None:
    site = cli.tmp / "site.yaml"
    site.write_text(site_yaml().replace("name: 見本 太郎", f"name: {NOTATIONS['full-width with U+3000']}", 1))
    output = cli.run("policy", "apply", str(site), code=1)
    assert "people.0.name" in output and "マイナンバー" in output
    site.write_text(site_yaml().replace("name: 見本 太郎", "name: 見本 太郎 (renamed)", 1))
    assert "マイナンバー" in cli.run("policy", "apply", str(site), "--comment", NOTATIONS["en dash"], code=1)
    assert_nowhere(cli.database, *NOTATIONS.values())


def test_media_cli_refuses_purpose_and_reason(cli: Cli) -> None:
    until = (timefmt.now() + timedelta(days=1)).isoformat()
    lend = ["media", "lend", "m-0001", "--person", "p-0001", "--terminal", "t-hr-01", "--until", until]
    output = cli.run(*lend, "--purpose", NOTATIONS["minus sign"], "--approved-by", "p-0002", code=1)
    assert "purpose" in output and "マイナンバー" in output
    cli.run(*lend[:-2], "--until", NUMBER, "--purpose", "x", "--approved-by", "p-0002", code=2)
    cli.run("media", "revoke", "loan-20261130-001", "--reason", NOTATIONS["space-hyphen-space"], code=1)
    cli.run("media", "return", NUMBER, code=1)
    assert_nowhere(cli.database, *NOTATIONS.values())


def test_door_commands_and_send_command_refuse_one(cli: Cli) -> None:
    output = cli.run("doors", "unlock", "room-hr", "--requested-by", NOTATIONS["zero-width space"], code=2)
    assert "requested_by" in output
    cli.run("doors", "unlock", NUMBER, code=2)
    cli.run("doors", "forgive-passback", "a-hr-room", "--person", NOTATIONS["MN prefix"], code=2)
    output = cli.run(
        "controller", "send-command", "door-hr-01", "agent.ping", "--args", json.dumps({"x": NUMBER}), code=2
    )
    assert "$.args.x" in output
    assert_nowhere(cli.database, *NOTATIONS.values())
    policy = parse_policy(site_yaml())
    with pytest.raises(door_commands.TargetError):
        door_commands.set_mode(policy, "door.lockdown", area=NUMBER)


# --- ingest: events and heartbeats through the real worker ------------------------------------------

AGENT = "term-m1"


@dataclass
class Ingest:
    worker: IngestWorker
    store: Store
    database: Path
    agent_key: Ed25519PrivateKey
    controller_key: Ed25519PrivateKey


@pytest.fixture(scope="module")
def ingest(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    lab = lab_on(pki, tmp_path_factory.mktemp("ingest") / "site")
    lab.write_controller_config()
    lab.add_agent(AGENT)
    config = load_config(lab.controller_config)
    engine = make_engine(config.resolved_database_url())
    upgrade(engine)
    controller_key = signing.load_private_key(config.signing_key)
    store = Store(engine, signing_key=controller_key)
    store.register_agent(AGENT, AgentCredentials.at(lab.pki_dir, AGENT).signing_pub.read_text())
    agent_key = signing.load_private_key(AgentCredentials.at(lab.pki_dir, AGENT).signing_key)
    yield Ingest(IngestWorker(config, store), store, config.var_dir / "controller.db", agent_key, controller_key)
    engine.dispose()


def _signed(key: Ed25519PrivateKey, seq: int, **changes: Any) -> bytes:
    body: dict[str, Any] = {
        "v": 1,
        "agent": AGENT,
        "seq": seq,
        "id": f"{seq:032x}",
        "type": "test.synthetic",
        "at": timefmt.fmt(timefmt.now()),
        "clock": {"synced": True, "offset_ms": 5},
        "payload": {"n": seq, "note": ""},
    }
    body.update(changes)
    return canonical.canonical_bytes({"event": body, "sig": signing.sign(key, "event", body)})


def test_events_with_a_my_number_anywhere_are_dead_lettered_redacted(ingest: Ingest) -> None:
    cases = [
        {"clock": {"synced": True, "offset_ms": int(NUMBER)}},
        {"clock": {"synced": True, "offset_ms": int(valid(ZERO_PREFIX))}},
        {"payload": {"n": 1, "note": NOTATIONS["ideographic space"]}},
        {"payload": {"n": 1, "note": NOTATIONS["MN prefix"]}},
        {"payload": {"n": 1, "note": NOTATIONS["zero-width space"]}},
    ]
    raws = [_signed(ingest.agent_key, 100 + i, **case) for i, case in enumerate(cases)]
    topic = topics.topic(AGENT, topics.EVENTS)
    ingest.worker.process([_Incoming(topic, raw, mid=i, qos=1) for i, raw in enumerate(raws)])

    assert ingest.store.event_seqs(AGENT) == []
    letters = {d.seq: d for d in ingest.store.list_dead_letters(limit=100) if d.seq and d.seq >= 100}
    assert sorted(letters) == [100 + i for i in range(len(cases))]
    for raw, letter in zip(raws, (letters[100 + i] for i in range(len(cases))), strict=True):
        assert letter.reason == errors.MY_NUMBER
        assert mynumber.REDACTED in letter.payload and not mynumber.contains_my_number(letter.payload)
        # Keyed: the controller's HKDF-derived key, never a plain digest of what arrived.
        assert letter.payload_mac == letter_mac(ingest.controller_key, raw)
        assert letter.payload_mac == hmac.new(letter_mac_key(ingest.controller_key), raw, "sha256").hexdigest()
        assert hashlib.sha256(raw).hexdigest().encode() not in database_bytes(ingest.database)
    assert_nowhere(ingest.database, *NOTATIONS.values())
    with ingest.store.engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("dead_letters")}
    assert "payload_sha256" not in columns and "payload_mac" in columns
    assert LETTER_MAC_INFO == b"sekisho/v1/dead-letter-mac"


def test_heartbeat_with_a_my_number_is_refused_counted_and_not_stored(ingest: Ingest) -> None:
    def heartbeat(**changes: Any) -> bytes:
        fields: dict[str, Any] = {
            "agent": AGENT,
            "at": timefmt.fmt(timefmt.now()),
            "version": "0.1.0",
            "boot_id": "0" * 32,
            "outbox_depth": 0,
            "next_seq": 1,
            "policy_state": "valid",
        }
        fields.update(changes)
        return messages.build_heartbeat(ingest.agent_key, **fields)

    topic = topics.topic(AGENT, topics.HEARTBEAT)
    before = ingest.worker.stats.reasons["heartbeat_my_number"]
    ingest.worker.process(
        [
            _Incoming(topic, heartbeat(version="MN" + NUMBER), mid=1, qos=1),
            _Incoming(topic, heartbeat(version=NOTATIONS["prolonged sound mark"]), mid=2, qos=1),
            _Incoming(topic, heartbeat(clock_offset_ms=int(NUMBER)), mid=3, qos=1),
        ]
    )
    assert ingest.worker.stats.reasons["heartbeat_my_number"] == before + 3
    with ingest.store.engine.connect() as conn:
        row = conn.execute(select(Agent.version, Agent.last_heartbeat).where(Agent.id == AGENT)).one()
    assert row.version is None and row.last_heartbeat is None
    assert_nowhere(ingest.database, "MN" + NUMBER, NOTATIONS["prolonged sound mark"])

    # A clean one is recorded; the store would refuse a bad one even if ingest had not.
    ingest.worker.process([_Incoming(topic, heartbeat(version=f"0.1.0+{wrong()}"), mid=4, qos=1)])
    assert [a.version for a in ingest.store.list_agents() if a.id == AGENT] == [f"0.1.0+{wrong()}"]
    assert not ingest.store.record_heartbeat(AGENT, {"version": "MN" + NUMBER}, timefmt.now() + timedelta(hours=1))
    assert_nowhere(ingest.database, "MN" + NUMBER)


def test_an_agent_id_holding_a_my_number_is_not_registered(ingest: Ingest) -> None:
    pem = signing.public_key_pem(signing.generate_key().public_key()).decode()
    with pytest.raises(ValueError, match="My Number"):
        ingest.store.register_agent(f"term-{NUMBER}", pem)


# --- the migration: old plain digests are gone from the files ------------------------------------------


def test_migration_0004_removes_the_plain_digests_from_the_database_file(tmp_path: Path) -> None:
    database = tmp_path / "controller.db"
    engine = make_engine(f"sqlite:///{database}")
    # As on a SQLite built without SECURE_DELETE (the default): the migration must zero freed pages itself.
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA secure_delete = OFF"))
    upgrade(engine, "0003")
    digest = hashlib.sha256(b"refused bytes").hexdigest()
    with engine.begin() as conn:
        for n in range(2000):
            conn.execute(
                text(
                    "INSERT INTO dead_letters (received_at, topic, reason, detail, payload, payload_sha256, size)"
                    " VALUES ('2026-12-01 00:00:00.000000', 't', 'my_number', 'd', :payload, :digest, 1)"
                ),
                {"payload": f"[REDACTED:my_number] {n}" + "x" * 200, "digest": digest},
            )
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    assert digest.encode() in database_bytes(database)
    reader = engine.connect()  # a running controller's connection stays open meanwhile
    reader.execute(text("SELECT 1")).all()
    try:
        upgrade(engine)
        assert digest.encode() not in database_bytes(database)
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("dead_letters")}
            assert "payload_sha256" not in columns and "payload_mac" in columns
            assert conn.execute(select(DeadLetter.payload_mac)).scalars().all() == [None] * 2000
    finally:
        reader.close()
        engine.dispose()


@pytest.mark.postgres
def test_migration_0004_rewrites_the_table_on_postgresql(pg_server: str) -> None:
    # DROP COLUMN alone only hides a column on PostgreSQL: the digests would stay in every row's bytes.
    digest = hashlib.sha256(b"refused bytes").hexdigest()
    with pg_database(pg_server) as url:
        upgrade(url, "0003")
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO dead_letters (received_at, topic, reason, detail, payload, payload_sha256, size)"
                        " SELECT now(), 't', 'my_number', 'd', 'p', :digest, 1 FROM generate_series(1, 500)"
                    ),
                    {"digest": digest},
                )
            with engine.connect() as conn:
                before = conn.execute(text("SELECT pg_relation_filepath('dead_letters')")).scalar_one()
            upgrade(engine)
            with engine.connect() as conn:
                conn.execute(text("CHECKPOINT"))
                after = conn.execute(text("SELECT pg_relation_filepath('dead_letters')")).scalar_one()
                data = Path(conn.execute(text("SHOW data_directory")).scalar_one())
                columns = {c["name"] for c in inspect(conn).get_columns("dead_letters")}
                assert conn.execute(text("SELECT count(*) FROM dead_letters")).scalar_one() == 500
                clustered = conn.execute(
                    text("SELECT bool_or(indisclustered) FROM pg_index WHERE indrelid = 'dead_letters'::regclass")
                )
                assert clustered.scalar_one() is False
            assert "payload_sha256" not in columns and "payload_mac" in columns
            assert after != before  # a new file; the old one goes at commit
            assert digest.encode() not in (data / after).read_bytes()
            assert not (data / before).exists() or digest.encode() not in (data / before).read_bytes()
        finally:
            engine.dispose()
