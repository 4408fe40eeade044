"""Door registers over HTTP (auth, filters, paging, refusals) and `sekisho doors …`: the register views, rebuild,
and remote door commands signed for, and delivered to, the agents that drive the doors (real broker)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from support.mqtt import connect_client
from support.site import wait_for
from test_door_registers import T0, Doors, scenario, site_yaml
from typer.testing import CliRunner

from sekisho.cli import app as sekisho_app
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig, load_config
from sekisho.controller.doors.registers import DoorRegisters
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.service import Controller
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.deploy.broker import Broker
from sekisho.deploy.pki import AgentCredentials, PkiPaths
from sekisho.lab import write_toml
from sekisho.protocol import door_commands, events, messages, signing, timefmt, topics

if TYPE_CHECKING:
    from store_fixtures import MakeAgent

TOKEN = "d" * 32


@dataclass
class Api:
    """A controller database with the demo site's door events projected, its API and its config file."""

    client: TestClient
    doors: Doors
    config: Path


def write_config(tmp_path: Path, var_dir: Path, **overrides: object) -> Path:
    """Write a dev-profile controller.toml for the CLI (certificate paths only matter for publishing)."""
    values: dict[str, object] = {
        "profile": "dev",
        "var_dir": str(var_dir),
        "ca_cert": str(tmp_path / "ca.pem"),
        "tls_cert": str(tmp_path / "c.pem"),
        "tls_key": str(tmp_path / "c.key"),
        "signing_key": str(tmp_path / "signing.key"),
    }
    values.update(overrides)
    return write_toml(tmp_path / "controller.toml", values)


@pytest.fixture
def api(tmp_path: Path, make_agent: MakeAgent) -> Iterator[Api]:
    var_dir = tmp_path / "var"
    engine = make_engine(f"sqlite:///{var_dir / 'controller.db'}")
    upgrade(engine)
    store = Store(engine)
    doors = Doors(store, make_agent)
    scenario(doors)
    doors.projector.run()
    config = ControllerConfig(
        profile="production",
        var_dir=var_dir,
        ca_cert=tmp_path / "ca.pem",
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "c.key",
        signing_key=tmp_path / "signing.key",
        api_tokens=[SecretStr(TOKEN)],
    )
    state = AppState(config, store, None, signing_key=signing.generate_key())
    client = TestClient(create_app(state), headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        yield Api(client, doors, write_config(tmp_path, var_dir))
    finally:
        engine.dispose()


def get(api: Api, path: str, **params: Any) -> Any:
    answer = api.client.get(path, params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- HTTP ------------------------------------------------------------------------------------------


def test_key_loans_over_http(api: Api) -> None:
    page = get(api, "/api/v1/keys/loans")
    loans = {item["key"]: item for item in page["items"]}
    assert set(loans) == {"k-archive", "k-server-rack", "k-cabinet-hr"} and page["next_after_id"] is None
    # Due an hour after T0 (long past): overdue; the rack key went back into its slot by someone else's hand.
    assert loans["k-archive"]["state"] == "overdue" and loans["k-archive"]["overdue"] is True
    assert loans["k-server-rack"]["wrong_slot"] is True and loans["k-server-rack"]["returned_by"] == "p-0001"
    assert loans["k-cabinet-hr"]["state"] == "return_only" and loans["k-cabinet-hr"]["person"] is None
    assert loans["k-archive"]["taken_at"] == "2026-11-17T00:00:00Z"  # 09:00 JST, served in UTC

    assert [i["key"] for i in get(api, "/api/v1/keys/loans", open="true")["items"]] == ["k-archive"]
    assert [i["key"] for i in get(api, "/api/v1/keys/loans", overdue="true")["items"]] == ["k-archive"]
    assert [i["key"] for i in get(api, "/api/v1/keys/loans", open="false")["items"]] == [
        "k-server-rack",
        "k-cabinet-hr",
    ]
    assert [i["key"] for i in get(api, "/api/v1/keys/loans", person="p-0002")["items"]] == ["k-server-rack"]
    assert [i["person"] for i in get(api, "/api/v1/keys/loans", key="k-archive")["items"]] == ["p-0001"]

    first = get(api, "/api/v1/keys/loans", limit=1)
    assert len(first["items"]) == 1 and first["next_after_id"] == first["items"][0]["id"]
    rest = get(api, "/api/v1/keys/loans", after_id=first["next_after_id"], limit=5)
    assert len(rest["items"]) == 2 and rest["next_after_id"] is None

    one = get(api, f"/api/v1/keys/loans/{loans['k-archive']['id']}")
    assert one["cabinet"] == "keys-01" and one["slot"] == 0
    missing = api.client.get("/api/v1/keys/loans/999999")
    assert missing.status_code == 404 and missing.json()["detail"] == "鍵の貸出 999999 がありません"


def test_door_log_presence_and_visits_over_http(api: Api) -> None:
    log = get(api, "/api/v1/doors/log", limit=1000)["items"]
    assert len(log) == 8 and {item["door_kind"] for item in log} == {"room", "locker"}
    [alarm] = get(api, "/api/v1/doors/log", kind="locker")["items"]
    assert (alarm["door"], alarm["type"], alarm["reason"]) == ("locker-02", "door.alarm", "tamper")
    back = get(api, "/api/v1/doors/log", door="room-hr-2")["items"]
    assert [(i["person"], i["direction"]) for i in back] == [("p-0001", "exit"), ("p-0001", "entry")]
    window = get(
        api,
        "/api/v1/doors/log",
        person="p-0001",
        since=(T0 + timedelta(minutes=5)).isoformat(),
        until=(T0 + timedelta(minutes=9)).isoformat(),
    )["items"]
    assert [i["direction"] for i in window] == ["exit", "exit"]  # 09:07, and the late one of 09:08
    paged = get(api, "/api/v1/doors/log", limit=3)
    assert len(paged["items"]) == 3 and paged["next_after_id"] == paged["items"][-1]["id"]

    inside = get(api, "/api/v1/areas/presence")
    assert {(i["area"], i["person"]) for i in inside} == {("a-hr-room", "p-0001"), ("a-hr-room", "p-0002")}
    assert [i["door"] for i in inside if i["person"] == "p-0001"] == ["room-hr-2"]
    assert len(get(api, "/api/v1/areas/a-hr-room/presence")) == 2
    assert get(api, "/api/v1/areas/a-hr-desk/presence") == []

    [visit] = get(api, "/api/v1/visits")["items"]
    assert (visit["visitor"], visit["escort"], visit["doors"]) == ("p-0006", "p-0002", ["room-hr", "room-hr"])
    assert get(api, "/api/v1/visits", open="true")["items"] == []
    assert len(get(api, "/api/v1/visits", since=(T0 + timedelta(minutes=20)).isoformat())["items"]) == 1
    assert get(api, "/api/v1/visits", since=(T0 + timedelta(hours=1)).isoformat())["items"] == []


@pytest.mark.parametrize(
    ("path", "params", "needle"),
    [
        ("/api/v1/doors/log", {"kind": "garage"}, "'room', 'locker' or 'key_cabinet'"),
        ("/api/v1/doors/log", {"since": "yesterday"}, "valid datetime"),
        ("/api/v1/doors/log", {"since": "2026-12-01T09:00:00"}, "needs a time zone"),
        ("/api/v1/doors/log", {"since": "2026-12-01T10:00+09:00", "until": "2026-12-01T09:00+09:00"}, "after since"),
        ("/api/v1/doors/log", {"limit": 0}, "greater than or equal to 1"),
        ("/api/v1/doors/log", {"door": "bad door"}, "string should match pattern"),
        ("/api/v1/keys/loans", {"open": "maybe"}, "valid boolean"),
        ("/api/v1/keys/loans", {"open": "false", "overdue": "true"}, "cannot be overdue"),
        ("/api/v1/keys/loans", {"after_id": -1}, "greater than or equal to 0"),
        ("/api/v1/keys/loans/abc", {}, "valid integer"),
        ("/api/v1/visits", {"since": "2026-12-01"}, "needs a time zone"),
        ("/api/v1/areas/bad%20area/presence", {}, "string should match pattern"),
    ],
)
def test_bad_parameters_are_422_with_the_reason(api: Api, path: str, params: dict[str, Any], needle: str) -> None:
    answer = api.client.get(path, params=params, headers={"Accept-Language": "en"})  # FastAPI's own are English
    assert answer.status_code == 422, answer.text
    assert needle.lower() in answer.text.lower()


def test_our_refusals_are_in_the_request_language(api: Api) -> None:
    """Japanese by default, English for Accept-Language: en or the console's language cookie; same JSON shape."""
    params = {"open": "false", "overdue": "true"}
    japanese = api.client.get("/api/v1/keys/loans", params=params)
    assert japanese.status_code == 422
    assert japanese.json() == {"detail": "open=false と overdue=true は両立しません（返却済みの鍵は延滞になりません）"}
    english = api.client.get("/api/v1/keys/loans", params=params, headers={"Accept-Language": "en-GB,ja;q=0.5"})
    assert english.json() == {
        "detail": "open=false and overdue=true contradict each other: a returned key cannot be overdue"
    }
    cookie = api.client.get("/api/v1/keys/loans/999999", headers={"Cookie": "sekisho_lang=en"})
    assert cookie.status_code == 404 and cookie.json() == {"detail": "no key loan 999999"}


def test_every_door_route_needs_a_token(api: Api) -> None:
    wrong = {"Authorization": "Bearer " + "x" * 32}
    routes = [
        "/api/v1/keys/loans",
        "/api/v1/keys/loans/1",
        "/api/v1/doors/log",
        "/api/v1/areas/presence",
        "/api/v1/areas/a-hr-room/presence",
        "/api/v1/visits",
    ]
    for n, route in enumerate(routes):
        # One client address per route: twelve failures from one address would lock it out (429).
        bare = TestClient(api.client.app, client=(f"192.0.2.{n + 1}", 50000))
        assert bare.get(route).status_code == 401, route
        assert bare.get(route, headers=wrong).status_code == 401, route
    paths = api.client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/keys/loans/{loan_id}", "/api/v1/areas/{area}/presence"} <= set(paths)


# --- CLI: the registers ----------------------------------------------------------------------------


def run_cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(sekisho_app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return result.output


def test_cli_shows_the_registers_and_rebuilds(api: Api) -> None:
    config = str(api.config)
    keys = run_cli("doors", "keys", "--config", config)
    # The command line speaks the process language (Japanese in the tests).
    assert "k-archive" in keys and "延滞" in keys and "別スロットへ返却: 2" in keys and "貸出記録なしの返却" in keys
    assert "k-archive" in run_cli("doors", "keys", "--open", "--config", config)
    assert "k-server-rack" not in run_cli("doors", "keys", "--overdue", "--config", config)
    log = run_cli("doors", "log", "--kind", "locker", "--since", "2026-11-17T00:00", "--config", config)
    assert "locker-02" in log and "tamper" in log
    assert "'garage' is not one of" in run_cli("doors", "log", "--kind", "garage", "--config", config, code=2)
    inside = run_cli("doors", "inside", "a-hr-room", "--config", config)
    assert "p-0001" in inside and "p-0002" in inside and "2 名" in inside
    assert "p-0006" in run_cli("doors", "visits", "--config", config)

    # A new event stored while no controller runs: the CLI brings the registers up to date first.
    api.doors.pass_door("p-0003", "entry", T0 + timedelta(hours=1))
    assert "3 名" in run_cli("doors", "inside", "--config", config)
    before = api.doors.tables()
    assert "イベント 13 件から" in run_cli("doors", "rebuild", "--config", config)
    assert api.doors.tables() == before
    overdue = run_cli("doors", "check-overdue", "--config", config)
    assert "延滞 1 件、新規の指摘 1 件" in overdue and "k-archive" in overdue
    assert "延滞 1 件、新規の指摘 0 件" in run_cli("doors", "check-overdue", "--config", config)


# --- with a real broker: ingest → registers, and remote door commands -------------------------------


def broker_site(pki: Path, broker: Broker, tmp_path: Path, **overrides: object) -> tuple[Path, Store]:
    """Write controller.toml for the test broker and apply the demo doors, driven by agent-a and agent-b."""
    paths = PkiPaths.at(pki)
    config = write_config(
        tmp_path,
        tmp_path / "var",
        broker_port=broker.controller_port,
        ca_cert=str(paths.ca_cert),
        tls_cert=str(paths.controller_cert),
        tls_key=str(paths.controller_key),
        signing_key=str(paths.controller_signing_key),
        **overrides,
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'controller.db'}")
    upgrade(engine)
    key = signing.load_private_key(paths.controller_signing_key)
    # With the controller's key, as `register-agent` opens it: ingest trusts only signed key lines.
    store = Store(engine, signing_key=key)
    # The front door, lockers and key cabinet on agent-a; the back door on agent-b.
    policy = parse_policy(site_yaml({"door-hr-01": "agent-a", "door-hr-02": "agent-b"}))
    PolicyService(store, key).apply(policy, source_sha256="0" * 64, created_by="test")
    return config, store


@pytest.mark.broker
def test_the_running_controller_projects_what_ingest_stores(pki: Path, broker: Broker, tmp_path: Path) -> None:
    config, store = broker_site(pki, broker, tmp_path, batch_wait_ms=5)
    front, back = AgentCredentials.at(pki, "agent-a"), AgentCredentials.at(pki, "agent-b")
    for name, creds in (("agent-a", front), ("agent-b", back)):
        store.register_agent(name, creds.signing_pub.read_text())
    ctl = Controller(load_config(config))
    ctl.start()
    clients = {name: connect_client(pki, broker.port, name) for name in ("agent-a", "agent-b")}
    registers = DoorRegisters(store)
    try:
        now = timefmt.now()

        def publish(agent: str, seq: int, at: Any, person: str, direction: str, door: str) -> None:
            key = signing.load_private_key((front if agent == "agent-a" else back).signing_key)
            payload = {"door": door, "person": person, "card_masked": "****", "rule": "r", "direction": direction}
            raw = events.build_event(key, agent=agent, seq=seq, type="door.access_granted", payload=payload, at=at)
            clients[agent].publish_wait(topics.topic(agent, topics.EVENTS), raw)

        publish("agent-a", 1, now - timedelta(minutes=10), "p-0001", "entry", "room-hr")
        publish("agent-b", 1, now - timedelta(minutes=2), "p-0001", "exit", "room-hr-2")
        publish("agent-b", 2, now - timedelta(minutes=1), "p-0001", "entry", "room-hr-2")
        wait_for(lambda: [r.door for r in registers.inside("a-hr-room")] == ["room-hr-2"], 15, "the re-entry")
        # agent-a was offline: its exit from before the re-entry arrives now and changes nothing.
        publish("agent-a", 2, now - timedelta(minutes=5), "p-0001", "exit", "room-hr")
        wait_for(lambda: len(registers.log(person="p-0001")) == 4, 15, "the late exit in the door log")
        [inside] = registers.inside("a-hr-room")
        assert inside.person == "p-0001" and inside.door == "room-hr-2"
    finally:
        for client in clients.values():
            client.close()
        ctl.stop()
        store.engine.dispose()


@pytest.mark.broker
def test_door_commands_are_signed_for_the_agents_that_drive_the_doors(
    pki: Path, broker: Broker, tmp_path: Path
) -> None:
    config, store = broker_site(pki, broker, tmp_path)
    engine = store.engine
    controller_key = signing.load_private_key(PkiPaths.at(pki).controller_signing_key)
    agents = {name: connect_client(pki, broker.port, name) for name in ("agent-a", "agent-b")}
    try:
        for name, client in agents.items():
            client.subscribe_wait(topics.topic(name, topics.COMMANDS))

        def received(agent: str) -> tuple[str, dict[str, Any]]:
            raw = agents[agent].next_message().payload
            verified = messages.open_command(raw, controller_key.public_key(), agent)
            # The door agent's own argument checks accept what the controller sends (the contract).
            door_commands.parse_args(door_commands.ARGS[verified.command.name], verified.command.args)
            return verified.command.name, verified.command.args

        cfg = str(config)
        sent = run_cli("doors", "unlock", "room-hr", "--seconds", "7", "--requested-by", "p-0002", "--config", cfg)
        assert "sent door.unlock to agent-a" in sent
        assert received("agent-a") == ("door.unlock", {"door": "room-hr", "seconds": 7, "requested_by": "p-0002"})

        run_cli("doors", "emergency-unlock", "--area", "a-hr-room", "--config", cfg)
        assert received("agent-a") == ("door.emergency_unlock", {"doors": ["room-hr"]})
        assert received("agent-b") == ("door.emergency_unlock", {"doors": ["room-hr-2"]})

        run_cli("doors", "lockdown", "--all", "--config", cfg)
        assert received("agent-a") == ("door.lockdown", {"doors": ["room-hr", "locker-01", "locker-02", "keys-01"]})
        assert received("agent-b") == ("door.lockdown", {"doors": ["room-hr-2"]})

        run_cli("doors", "normal", "--door", "locker-01", "--door", "room-hr-2", "--config", cfg)
        assert received("agent-a") == ("door.normal", {"doors": ["locker-01"]})
        assert received("agent-b") == ("door.normal", {"doors": ["room-hr-2"]})

        run_cli("doors", "forgive-passback", "a-hr-room", "--person", "p-0001", "--config", cfg)
        for agent in ("agent-a", "agent-b"):
            assert received(agent) == ("door.forgive_passback", {"area": "a-hr-room", "person": "p-0001"})
        run_cli("doors", "forgive-passback", "a-hr-room", "--config", cfg)
        for agent in ("agent-a", "agent-b"):
            assert received(agent) == ("door.forgive_passback", {"area": "a-hr-room"})
        run_cli("doors", "unlock", "locker-01", "--config", cfg)
        name, args = received("agent-a")  # requested_by defaults to the operator's account
        assert (name, args["door"], args["seconds"]) == ("door.unlock", "locker-01", 5)

        # Refusals name the reason and send nothing.
        # (in the process language: the tests run in Japanese)
        assert "扉 nowhere は有効なポリシーにありません" in run_cli(
            "doors", "unlock", "nowhere", "--config", cfg, code=2
        )
        refused = run_cli("doors", "emergency-unlock", "--door", "locker-02", "--config", cfg, code=2)
        assert "非常解錠できません: locker-02" in refused
        assert "どれか一つを指定してください" in run_cli("doors", "lockdown", "--config", cfg, code=2)
        assert "区域 a-nowhere は有効なポリシーにありません" in run_cli(
            "doors", "normal", "--area", "a-nowhere", "--config", cfg, code=2
        )
        assert "p-9999 は有効なポリシーにいません" in run_cli(
            "doors", "forgive-passback", "a-hr-room", "--person", "p-9999", "--config", cfg, code=2
        )
        for client in agents.values():
            assert client.received() == []

        # Every command is on record (its nonce refuses a replay at the agent).
        with engine.connect() as conn:
            names = conn.exec_driver_sql("SELECT agent_id, name FROM issued_commands ORDER BY issued_at").all()
        assert [tuple(row) for row in names] == [
            ("agent-a", "door.unlock"),
            ("agent-a", "door.emergency_unlock"),
            ("agent-b", "door.emergency_unlock"),
            ("agent-a", "door.lockdown"),
            ("agent-b", "door.lockdown"),
            ("agent-a", "door.normal"),
            ("agent-b", "door.normal"),
            ("agent-a", "door.forgive_passback"),
            ("agent-b", "door.forgive_passback"),
            ("agent-a", "door.forgive_passback"),
            ("agent-b", "door.forgive_passback"),
            ("agent-a", "door.unlock"),
        ]
    finally:
        for client in agents.values():
            client.close()
        engine.dispose()
