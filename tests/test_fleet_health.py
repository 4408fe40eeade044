"""Fleet health (issue 11, item 5): heartbeats through the real broker and ingest fill `sekisho fleet status`,
/api/v1/agents and /metrics; states move online → stale → offline on a controlled clock; the agent's
node_exporter textfile; fingerprint enrolment counts per person from a real fprintd.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.fprintd import FprintdStack, missing_prerequisites
from support.lab import running_site
from support.mqtt import connect_client
from support.site import wait_for

from sekisho.agents.login.fingerprints import FingerprintCensus
from sekisho.agents.runtime.agent import Agent
from sekisho.agents.runtime.config import load_config as load_agent_config
from sekisho.agents.runtime.policy_cache import PolicyCache
from sekisho.agents.runtime.textfile import AgentVitals, render
from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.fleet.health import Thresholds, fleet_health
from sekisho.controller.fleet.metrics import PublicationStats, controller_registry
from sekisho.controller.ingest.worker import IngestStats
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.service import Controller
from sekisho.controller.store.store import Store
from sekisho.deploy.pki import AgentCredentials
from sekisho.drivers.biometric import SimulatedFingerprint
from sekisho.lab import Lab
from sekisho.protocol import errors, messages, signing, timefmt, topics

pytestmark = pytest.mark.broker
DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"
TERMINAL, DOOR, SILENT = "term-hr-01", "door-hr-01", "term-acc-01"


@pytest.fixture
def running(pki: Path, tmp_path: Path) -> Iterator[tuple[Lab, Controller]]:
    with running_site(pki, tmp_path / "site", agents=(TERMINAL, DOOR, SILENT), policy=DEMO) as site:
        yield site


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def start_terminal_agent(lab: Lab, textfile: Path, sensor: SimulatedFingerprint) -> Agent:
    lab.add_agent(TERMINAL, heartbeat_interval_s=1, metrics_textfile=str(textfile))
    agent = Agent(load_agent_config(lab.agent_config(TERMINAL)))
    census = FingerprintCensus(sensor, agent.policy, "t-hr-01", refresh_s=0.5)
    agent.describe("terminal", fingerprints=census.status)
    agent.start()
    return agent


def test_heartbeats_fill_status_api_and_metrics_and_states_follow_the_clock(
    running: tuple[Lab, Controller], tmp_path: Path
) -> None:
    lab, ctl = running
    textfile = tmp_path / "prom" / "sekisho.prom"
    textfile.parent.mkdir()
    # p-0001 (mihon.taro) has two fingers enrolled, p-0002 (mihon.hanako) none.
    sensor = SimulatedFingerprint({"mihon.taro": ["left-index", "right-index"]})
    agent = start_terminal_agent(lab, textfile, sensor)
    try:
        store = ctl.store

        def reported() -> dict | None:
            row = next(a for a in store.list_agents() if a.id == TERMINAL)
            hb = row.last_heartbeat or {}
            return hb if hb.get("fingerprints") and hb.get("policy_version") == 1 else None

        wait_for(lambda: reported() is not None, 20, "a heartbeat with the policy applied and fingerprints")
        now = timefmt.now()
        agents = {a.id: a for a in fleet_health(store, Thresholds.from_config(ctl.config), now)}
        term = agents[TERMINAL]
        cert = x509.load_pem_x509_certificate(AgentCredentials.at(lab.pki_dir, TERMINAL).tls_cert.read_bytes())
        assert (term.state, term.kind, term.heartbeat_interval_s) == ("online", "terminal", 1)
        assert term.version and term.outbox_depth is not None
        assert (term.policy_version, term.current_policy_version, term.policy_current) == (1, 1, True)
        assert term.cert_not_after == cert.not_valid_after_utc
        assert term.cert_days_left == pytest.approx((cert.not_valid_after_utc - now).total_seconds() / 86400, abs=0.1)
        assert term.fingerprints is not None and term.fingerprints.error is None
        assert term.fingerprints.counts == {"p-0001": 2, "p-0002": 0}
        assert term.fingerprints.not_enrolled == ["p-0002"]
        assert agents[SILENT].state == "offline" and agents[SILENT].last_seen_at is None

        # The states follow the age of the last heartbeat against the interval the agent reported (1 s),
        # judged at chosen moments: online ≤ 1 + 15 s grace, stale ≤ 3 × 1 + 15 s, offline beyond.
        seen = term.last_seen_at
        assert seen is not None
        thresholds = Thresholds.from_config(ctl.config)

        def state_at(seconds: float) -> str:
            return {a.id: a for a in fleet_health(store, thresholds, seen + timedelta(seconds=seconds))}[TERMINAL].state

        assert [state_at(s) for s in (0, 16, 16.5, 18, 18.5, 3600)] == [
            "online",
            "online",
            "stale",
            "stale",
            "offline",
            "offline",
        ]

        # The API serves the same, on an injected clock (stopped agents cannot be told apart by waiting).
        frozen = seen + timedelta(seconds=17)
        publications = ctl.keeper.publications if ctl.keeper is not None else None
        state = AppState(ctl.config, store, ctl.worker.stats, publications=publications, clock=lambda: frozen)
        api = TestClient(create_app(state))
        stale = api.get("/api/v1/agents", params={"state": "stale"}).json()
        assert [a["id"] for a in stale] == [TERMINAL]
        assert stale[0]["fingerprints"]["counts"] == {"p-0001": 2, "p-0002": 0}
        assert api.get("/api/v1/agents", params={"state": "bogus"}).status_code == 422

        # /metrics: the named series, with values that move when events and dead letters arrive.
        before = metric_values(api.get("/metrics").text)
        assert before[("sekisho_agents", (("state", "stale"),))] == 1
        assert before[("sekisho_agents", (("state", "offline"),))] == 2  # the door and the silent terminal
        assert before[("sekisho_agent_policy_version", (("agent", TERMINAL),))] == 1
        assert before[("sekisho_policy_current_version", ())] == 1
        assert before[("sekisho_agent_cert_not_after_timestamp_seconds", (("agent", TERMINAL),))] == pytest.approx(
            cert.not_valid_after_utc.timestamp()
        )
        assert before[("sekisho_ingest_messages_total", (("outcome", "heartbeat"),))] >= 1
        assert before[("sekisho_policy_publications_total", ())] >= 1
        assert before[("sekisho_policy_last_published_version", ())] == 1
        stored_before = before[("sekisho_ingest_messages_total", (("outcome", "stored"),))]
        lag_before = before[("sekisho_ingest_lag_seconds_count", ())]

        agent.emit("test.synthetic", {"n": 1, "note": "metrics"})
        assert agent.wait_drained(15)
        client = connect_client(lab.pki_dir, lab.broker.port, DOOR)
        client.publish_wait(topics.topic(DOOR, topics.EVENTS), b"\x00not json")
        client.close()
        wait_for(lambda: ctl.worker.stats.dead_lettered >= 1, 10, "the garbage to be dead-lettered")
        after = metric_values(api.get("/metrics").text)
        assert after[("sekisho_ingest_messages_total", (("outcome", "stored"),))] > stored_before
        assert after[("sekisho_ingest_lag_seconds_count", ())] > lag_before
        assert after[("sekisho_ingest_dead_letters_total", (("reason", errors.MALFORMED),))] == 1
        assert after[("sekisho_dead_letters_stored", (("reason", errors.MALFORMED),))] == 1

        # The agent's textfile: written atomically after each heartbeat, parseable, with the ack now seen.
        labels = (("agent", TERMINAL), ("kind", "terminal"))

        def drained_in_textfile() -> bool:
            if not textfile.exists():
                return False
            seen = metric_values(textfile.read_text())
            return ("sekisho_agent_last_ack_age_seconds", labels) in seen and seen[
                ("sekisho_agent_outbox_depth", labels)
            ] == 0

        wait_for(drained_in_textfile, 10, "the textfile to show the last ack and an empty outbox")
        local = metric_values(textfile.read_text())
        assert local[("sekisho_agent_policy_version", labels)] == 1
        assert local[("sekisho_agent_connected", labels)] == 1
        assert local[("sekisho_agent_heartbeats_sent_total", labels)] >= 1
        assert local[("sekisho_agent_cert_not_after_timestamp_seconds", labels)] == pytest.approx(
            cert.not_valid_after_utc.timestamp()
        )
        assert oct(textfile.stat().st_mode & 0o777) == "0o644"
        assert [p.name for p in textfile.parent.iterdir()] == ["sekisho.prom"]  # no temporary file left behind
    finally:
        agent.stop()

    # `sekisho fleet status` as an administrator runs it: JSON at a chosen moment, a filter, and the table.
    lab.sekisho("controller", "revoke-agent", DOOR, "--config", str(lab.controller_config))
    at = timefmt.fmt(seen + timedelta(seconds=30))
    out = lab.sekisho("fleet", "status", "--json", "--at", at, "--config", str(lab.controller_config))
    doc = json.loads(out.stdout)
    assert doc["at"] == at
    assert doc["counts"] == {"online": 0, "stale": 0, "offline": 2, "revoked": 1}
    states = {a["id"]: a["state"] for a in doc["agents"]}
    assert states == {TERMINAL: "offline", DOOR: "revoked", SILENT: "offline"}
    [term_doc] = [a for a in doc["agents"] if a["id"] == TERMINAL]
    assert term_doc["fingerprints"]["counts"] == {"p-0001": 2, "p-0002": 0}
    assert term_doc["policy_current"] is True and term_doc["kind"] == "terminal"
    only = lab.sekisho("fleet", "status", "--json", "--state", "revoked", "--config", str(lab.controller_config))
    assert [a["id"] for a in json.loads(only.stdout)["agents"]] == [DOOR]
    table = lab.sekisho("fleet", "status", "--config", str(lab.controller_config)).stdout
    assert TERMINAL in table and "revoked" in table and "1/2" in table
    refused = lab.sekisho("fleet", "status", "--state", "sleepy", "--config", str(lab.controller_config), check=False)
    assert refused.returncode == 2


def test_older_heartbeats_are_accepted_and_oversized_or_bad_ones_refused(running: tuple[Lab, Controller]) -> None:
    lab, ctl = running
    key = signing.load_private_key(AgentCredentials.at(lab.pki_dir, DOOR).signing_key)
    base = {
        "agent": DOOR,
        "at": timefmt.fmt(timefmt.now()),
        "version": "0.0.9",
        "boot_id": "ab" * 16,
        "outbox_depth": 3,
        "next_seq": 4,
        "policy_state": "none",
    }
    old = messages.build_heartbeat(key, **base)
    # What an agent before issue 11 sent: none of the later fields on the wire.
    older_fields = {"v", *base, "oldest_unacked_age_s", "clock_offset_ms", "policy_version"}
    assert set(json.loads(old)["heartbeat"]) == older_fields
    too_many = {f"p-{i:04d}": 1 for i in range(messages.MAX_FINGERPRINT_PEOPLE + 1)}
    fingerprints = {"checked_at": base["at"], "enrolled": too_many}
    body = {**json.loads(old)["heartbeat"], "version": "0.0.9-bad", "fingerprints": fingerprints}
    oversized = json.dumps({"heartbeat": body, "sig": signing.sign(key, "heartbeat", body)}).encode()
    bad_code = {**json.loads(old)["heartbeat"], "last_error": {"code": "Fail: secret=abc", "at": base["at"]}}
    bad_error = json.dumps({"heartbeat": bad_code, "sig": signing.sign(key, "heartbeat", bad_code)}).encode()
    client = connect_client(lab.pki_dir, lab.broker.port, DOOR)
    try:
        for raw in (oversized, bad_error, old):
            client.publish_wait(topics.topic(DOOR, topics.HEARTBEAT), raw, qos=0)
        wait_for(lambda: ctl.worker.stats.heartbeats >= 1, 10, "the older heartbeat to be recorded")
    finally:
        client.close()
    assert ctl.worker.stats.reasons[f"heartbeat_{errors.SCHEMA}"] == 2
    [door] = [a for a in fleet_health(ctl.store, Thresholds.from_config(ctl.config)) if a.id == DOOR]
    assert (door.state, door.version, door.outbox_depth, door.kind, door.fingerprints) == (
        "online",
        "0.0.9",
        3,
        None,
        None,
    )


def test_thresholds_fall_back_to_the_configured_interval_and_never_seen_is_offline() -> None:
    t = Thresholds(default_interval_s=30, grace_s=15, offline_after=3)
    assert [t.state(age, None) for age in (None, 0, 45, 46, 105, 106)] == [
        "offline",
        "online",
        "online",
        "stale",
        "stale",
        "offline",
    ]
    # The case: an agent stopped for 87 s is no longer shown as fine.
    assert t.state(87, 30) == "stale"


@pytest.mark.skipif(missing_prerequisites() is not None, reason=f"fprintd stack: {missing_prerequisites()}")
def test_real_fprintd_counts_enrolled_fingers_per_person(tmp_path: Path) -> None:
    from sekisho.drivers.biometric.fprintd import FprintdBackend

    site = parse_policy(DEMO.read_text(encoding="utf-8"))
    controller_key = signing.generate_key()
    bundle = messages.build_bundle(
        controller_key, agent=TERMINAL, version=7, policy=site.for_agent(TERMINAL), lifetime=timedelta(hours=1)
    )
    (tmp_path / "state").mkdir(mode=0o700)
    cache = PolicyCache(tmp_path / "state", controller_key.public_key(), TERMINAL)
    assert cache.offer(bundle).status == "applied"
    clock = [100.0]
    with FprintdStack(tmp_path / "fp") as stack:
        stack.enroll("mihon.taro", "taro-finger")
        backend = FprintdBackend(bus_address=stack.address, call_timeout_s=5.0)
        assert backend.enrolled_fingers(["mihon.taro", "mihon.hanako"]) == {"mihon.taro": 1, "mihon.hanako": 0}
        census = FingerprintCensus(backend, cache, "t-hr-01", refresh_s=300, monotonic=lambda: clock[0])
        first = census.status()
        assert first is not None and first["error"] is None
        assert first["enrolled"] == {"p-0001": 1, "p-0002": 0}
        # Valid on the wire as it stands.
        messages.FingerprintStatus.model_validate(first)
        stack.enroll("mihon.hanako", "hanako-finger")
        assert census.status() == first  # cached until refresh_s has passed
        clock[0] += 301
        assert census.status()["enrolled"] == {"p-0001": 1, "p-0002": 1}
        stack.stop_fprintd()
        clock[0] += 301
        down = census.status()
        assert down is not None and down["error"] == "no_sensor" and down["enrolled"] == {}


def test_textfile_render_leaves_out_what_is_unknown() -> None:
    vitals = AgentVitals(
        agent="term-x",
        kind="agent",
        outbox_depth=5,
        oldest_unacked_age_s=None,
        last_ack_age_s=None,
        policy_version=None,
        cert_not_after=datetime(2030, 1, 1, tzinfo=UTC),
        heartbeats_sent=2,
        errors=0,
        connected=False,
    )
    values = metric_values(render(vitals).decode())
    labels = (("agent", "term-x"), ("kind", "agent"))
    assert values[("sekisho_agent_outbox_depth", labels)] == 5
    assert values[("sekisho_agent_heartbeats_sent_total", labels)] == 2
    assert ("sekisho_agent_policy_version", labels) not in values
    assert ("sekisho_agent_last_ack_age_seconds", labels) not in values
    expiry = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert values[("sekisho_agent_cert_not_after_timestamp_seconds", labels)] == expiry


def test_grafana_dashboard_uses_only_series_that_exist(store: Store) -> None:
    """Every sekisho_* name in the sample dashboard is one the controller or the agents' textfile exposes."""
    policy = parse_policy(DEMO.read_text(encoding="utf-8"))
    assert PolicyService(store, signing.generate_key()).apply(policy, source_sha256="0" * 64, created_by="test") == 1
    stats = IngestStats()
    publications = PublicationStats()
    publications.published(1)
    registry = controller_registry(store, Thresholds(), ingest=stats, publications=publications, clock=timefmt.now)
    names = {family.name for family in text_string_to_metric_families(generate_latest(registry).decode())}
    vitals = AgentVitals("term-x", "agent", 0, 1, 1.0, 1, datetime(2030, 1, 1, tzinfo=UTC), 1, 1, True)
    names |= {family.name for family in text_string_to_metric_families(render(vitals).decode())}
    dashboard = (Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "sekisho-fleet.json").read_text()
    used = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in re.findall(r"sekisho_[a-z_]+", dashboard)}
    used.discard("sekisho_fleet")  # the dashboard's uid
    assert used and used <= names, used - names
