"""Put an enrolled card into a site.yaml: add the person's card entry or update it, and check the result.

The entry carries what the agents match and verify — the keyed UID hash and the card's PIV public key —
never the raw UID. The whole document is validated as `sekisho policy apply` would before the file is
replaced, and the file as it was is kept beside it (``site.yaml.bak``): the rewrite does not keep YAML
comments.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from sekisho.common.files import write_atomically
from sekisho.controller.policy.loader import PolicyError, _StrictLoader, parse_policy

CardKind = Literal["piv", "felica", "mifare", "osdp", "other"]


@dataclass(frozen=True, slots=True)
class CardEntry:
    """The policy fields of one enrolled card."""

    person: str
    kind: CardKind
    uid_hash: str
    public_key_pem: str | None

    def fields(self) -> dict[str, Any]:
        """Return the card's fields as site.yaml holds them (without its id)."""
        out: dict[str, Any] = {"person": self.person, "kind": self.kind, "uid_hash": self.uid_hash}
        if self.public_key_pem is not None:
            out["public_key_pem"] = self.public_key_pem
        return out


def _pick(cards: list[dict[str, Any]], entry: CardEntry, card_id: str | None) -> tuple[str, int | None]:
    """Return the card id to write and the index of the entry it replaces (None: a new entry)."""
    if card_id is not None:
        for index, card in enumerate(cards):
            if card.get("id") == card_id:
                if card.get("person") != entry.person:
                    raise PolicyError([f"card {card_id!r} belongs to {card.get('person')!r}, not {entry.person!r}"])
                return card_id, index
        return card_id, None
    own = [(i, c) for i, c in enumerate(cards) if c.get("person") == entry.person and c.get("kind") == entry.kind]
    if len(own) > 1:
        names = ", ".join(str(c.get("id")) for _, c in own)
        raise PolicyError([f"{entry.person} has several {entry.kind} cards ({names}): name one with --card-id"])
    if own:
        index, card = own[0]
        return str(card["id"]), index
    existing = {c.get("id") for c in cards}
    base = f"c-{entry.person.removeprefix('p-')}"
    candidate, n = base, 1
    while candidate in existing:
        n += 1
        candidate = f"{base}-{n}"
    return candidate, None


def upsert_card(policy_path: Path, entry: CardEntry, *, card_id: str | None = None) -> tuple[str, str]:
    """Add or update the person's card in site.yaml; return (card id, "added" | "updated").

    Raises PolicyError if the person is not in the policy, the UID hash is another card's, or the result
    would not be a valid policy; the file is then left untouched.
    """
    text = policy_path.read_text(encoding="utf-8")
    parse_policy(text, str(policy_path))  # the file as it stands must be valid, or we would hide its problems
    doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    cards: list[dict[str, Any]] = list(doc.get("cards") or [])
    if entry.person not in {p.get("id") for p in doc.get("people") or []}:
        raise PolicyError([f"person {entry.person!r} is not in {policy_path.name}"])
    chosen, index = _pick(cards, entry, card_id)
    taken = [c.get("id") for i, c in enumerate(cards) if c.get("uid_hash") == entry.uid_hash and i != index]
    if taken:
        raise PolicyError([f"this card is already enrolled as {taken[0]!r}"])
    card: dict[str, Any] = {"id": chosen, **entry.fields()}
    if index is None:
        cards.append(card)
        action = "added"
    else:
        # Keep what enrolment does not read (status, validity window); replace what it does.
        kept = {k: v for k, v in cards[index].items() if k not in ("public_key_pem",)}
        cards[index] = {**kept, **card}
        action = "updated"
    doc["cards"] = cards
    new_text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, default_flow_style=False)
    parse_policy(new_text, str(policy_path))
    shutil.copy2(policy_path, policy_path.with_name(policy_path.name + ".bak"))
    write_atomically(policy_path, new_text.encode("utf-8"), mode=policy_path.stat().st_mode & 0o777)
    return chosen, action
