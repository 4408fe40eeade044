"""Media API: inventory, loan queries, lend / return / revoke over HTTP, refusals, tokens in production."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from test_media import site_yaml

from sekisho.controller.api.app import create_app
from sekisho.controller.api.deps import AppState
from sekisho.controller.config import ControllerConfig
from sekisho.controller.media.register import MediaRegister
from sekisho.controller.policy.loader import parse_policy
from sekisho.controller.policy.service import PolicyService
from sekisho.controller.store import Store, make_engine, upgrade
from sekisho.protocol import signing, timefmt

TOKEN = "t" * 32


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Store, list[int]]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    store = Store(engine)
    key = signing.generate_key()
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
    published: list[int] = []
    state = AppState(config, store, None, on_policy_change=lambda: published.append(1))
    client = TestClient(create_app(state), headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        yield client, store, published
    finally:
        engine.dispose()


def _loan(**overrides: Any) -> dict[str, Any]:
    body = {
        "medium": "m-0001",
        "person": "p-0001",
        "terminals": ["t-hr-01"],
        "ends_at": (timefmt.now() + timedelta(days=1)).isoformat(),
        "purpose": "年末調整データ (test)",
        "approved_by": "p-0002",
        "recorded_by": "p-0002",
    }
    body.update(overrides)
    return body


def test_lend_return_revoke_over_http(api: tuple[TestClient, Store, list[int]]) -> None:
    client, store, published = api
    made = client.post("/api/v1/media/loans", json=_loan())
    assert made.status_code == 201, made.text
    loan_id, version = made.json()["loan"]["id"], made.json()["version"]
    assert version == 2 and made.json()["loan"]["state"] == "on_loan" and published == [1]
    # The stored version really carries the loan to that terminal's agent.
    raw = PolicyService(store, signing.generate_key()).current()
    assert raw is not None and [loan.id for loan in raw[1].loans] == [loan_id]

    inventory = {m["id"]: m for m in client.get("/api/v1/media").json()}
    assert inventory["m-0001"]["loan"]["person"] == "p-0001" and inventory["m-0002"]["state"] == "in_store"
    assert [r["id"] for r in client.get("/api/v1/media/loans", params={"active": True}).json()] == [loan_id]
    assert client.get("/api/v1/media/loans", params={"person": "p-0003"}).json() == []
    assert client.get(f"/api/v1/media/loans/{loan_id}").json()["medium"] == "m-0001"
    assert client.get("/api/v1/media/loans/loan-nope").status_code == 404

    back = client.post(f"/api/v1/media/loans/{loan_id}/return", json={"received_by": "p-0002"})
    assert back.status_code == 200 and back.json()["version"] == 3 and back.json()["loan"]["state"] == "returned"
    again = client.post(f"/api/v1/media/loans/{loan_id}/return", json={"received_by": "p-0002"})
    assert again.status_code == 409 and again.json()["detail"] == f"貸出 {loan_id} は終了しています（返却済み）"
    english = client.post(
        f"/api/v1/media/loans/{loan_id}/return", json={"received_by": "p-0002"}, headers={"Accept-Language": "en"}
    )
    assert english.json() == {"detail": f"loan {loan_id} has already ended: it was returned"}

    second = client.post("/api/v1/media/loans", json=_loan(read_only=False)).json()["loan"]["id"]
    revoked = client.post(f"/api/v1/media/loans/{second}/revoke", json={"reason": "目的外使用の疑い"})
    assert revoked.status_code == 200 and revoked.json()["loan"]["revoke_reason"] == "目的外使用の疑い"
    assert [e.action for e in MediaRegister(store).list_loan_log()] == ["lend", "return", "lend", "revoke"]
    assert len(published) == 4


@pytest.mark.parametrize(
    ("overrides", "code", "needle", "english"),
    [
        ({"approved_by": "p-0001"}, 422, "職務の分離", "separation of duties"),
        ({"approved_by": "p-0003"}, 422, "区域責任者・責任者ではありません", "area_manager"),
        ({"medium": "m-0009"}, 422, "貸出できません（retired）", "it is retired"),
        ({"person": "p-0009"}, 422, "在籍していません", "inactive"),
        ({"ends_at": "2030-01-01T00:00:00"}, 422, "タイムゾーン", "time zone"),
        ({"surprise": 1}, 422, "Extra inputs", "Extra inputs"),  # FastAPI's own text, in English only
    ],
)
def test_lend_refusals_over_http(
    api: tuple[TestClient, Store, list[int]], overrides: dict[str, Any], code: int, needle: str, english: str
) -> None:
    """A refusal is in Japanese by default and in English for Accept-Language: en; the JSON shape is the same."""
    client, store, _ = api
    refused = client.post("/api/v1/media/loans", json=_loan(**overrides))
    assert refused.status_code == code and needle in refused.text
    in_english = client.post("/api/v1/media/loans", json=_loan(**overrides), headers={"Accept-Language": "en"})
    assert in_english.status_code == code and english in in_english.text
    assert type(in_english.json()["detail"]) is type(refused.json()["detail"])
    assert MediaRegister(store).list_loans() == []


def test_overlap_is_409(api: tuple[TestClient, Store, list[int]]) -> None:
    client, _, _ = api
    assert client.post("/api/v1/media/loans", json=_loan()).status_code == 201
    clash = client.post("/api/v1/media/loans", json=_loan(person="p-0003", terminals=["t-acc-01"]))
    assert clash.status_code == 409 and "貸出中です" in clash.json()["detail"]


def test_production_requires_a_token(api: tuple[TestClient, Store, list[int]]) -> None:
    client, _, _ = api
    bare = TestClient(client.app)
    assert bare.get("/api/v1/media").status_code == 401
    assert bare.post("/api/v1/media/loans", json=_loan()).status_code == 401
    wrong = {"Authorization": "Bearer " + "x" * 32}
    assert bare.get("/api/v1/media/loans", headers=wrong).status_code == 401
    assert "/api/v1/media/loans/{loan_id}/return" in client.get("/openapi.json").json()["paths"]
