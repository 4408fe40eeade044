"""Site policy: strict loading, diffs, per-agent least-privilege bundles."""

from __future__ import annotations

from pathlib import Path

import pytest

from sekisho.controller.policy.loader import PolicyError, load_policy_file, parse_policy
from sekisho.controller.policy.service import diff_policy, sign_bundles
from sekisho.protocol import messages, signing

DEMO = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "site.yaml"


def test_demo_policy_loads():
    policy, sha = load_policy_file(DEMO)
    assert policy.agent_ids() == ["door-hr-01", "term-acc-01", "term-hr-01"]
    assert len(sha) == 64


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("site: {name: a}\nsite: {name: b}\n", "duplicate key"),
        ("site: {name: a, colour: red}\n", "Extra inputs"),
        ("site: {name: a}\ncards: [{id: c1, person: nobody, uid_hash: '" + "0" * 64 + "'}]\n", "unknown person"),
        ("site: {name: a}\npeople: [{id: p1, name: x}, {id: p1, name: y}]\n", "duplicate person"),
        ("site: {name: a}\nterminals: [{id: t1, name: t, agent: Bad Agent}]\n", "agent"),
        ("- just a list\n", "mapping"),
        ("site: {name: a\n", "YAML error"),
    ],
)
def test_policy_loader_rejects_with_location(text, needle):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "site.yaml")
    assert any(needle in p for p in info.value.problems), info.value.problems
    assert all(p.startswith("site.yaml") for p in info.value.problems)


def test_diff_names_changed_ids():
    policy, _ = load_policy_file(DEMO)
    old = policy.model_dump(mode="json")
    old["people"] = [p for p in old["people"] if p["id"] != "p-0005"]
    old["terminals"][0]["handlers"] = ["p-0001"]
    diff = diff_policy(old, policy, 4)
    assert diff.changes["people"]["added"] == ["p-0005"]
    assert diff.changes["terminals"]["changed"] == ["t-hr-01"]
    assert "+" in diff.unified and "version 4" in diff.unified
    assert diff_policy(policy.model_dump(mode="json"), policy, 5).empty


def test_bundles_carry_only_what_each_agent_needs():
    policy, _ = load_policy_file(DEMO)
    key = signing.generate_key()
    bundles = sign_bundles(key, policy, 9, extra_agents={"term-retired"})
    acc = messages.open_bundle(bundles["term-acc-01"], key.public_key(), "term-acc-01").bundle
    assert acc.version == 9
    assert [p["id"] for p in acc.policy["people"]] == ["p-0003"]
    assert [c["id"] for c in acc.policy["cards"]] == ["c-0003"]
    assert acc.policy["doors"] == []
    retired = messages.open_bundle(bundles["term-retired"], key.public_key(), "term-retired").bundle
    assert retired.policy["people"] == [] and retired.policy["terminals"] == []
