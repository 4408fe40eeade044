"""What the pure door logic asks its owner to do: the explicit boundary between decisions and I/O.

``DoorMachine``, ``AccessController`` and ``KeyCabinetTracker`` return lists of these; only
``service.DoorAgentCore`` carries them out (outbox, lock board, reader LEDs), in list order, so an
event that justifies an action always comes before the action in the same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["normal", "emergency_unlock", "lockdown"]
Direction = Literal["entry", "exit", "both"]


@dataclass(frozen=True, slots=True)
class SetRelay:
    """Drive a lock relay: on releases the lock; max_on_ms makes the board re-lock by itself if we die."""

    relay: int
    on: bool
    max_on_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Emit:
    """Record an event in the agent's outbox (before anything that depends on it is done)."""

    type: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Feedback:
    """Tell the person at a reader how it went (LED/buzzer); best effort."""

    reader: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Passage:
    """One person let through by a grant, with the direction of the reader they used."""

    person: str
    direction: Direction | None = None
    area: str | None = None


@dataclass(frozen=True, slots=True)
class Unlock:
    """Open a door for a recorded grant (access → machine); skipped if the grant's record failed."""

    door: str
    passages: tuple[Passage, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Opened:
    """Notice (machine → owner): a door opened, with the people of the grant it opened under (none if forced)."""

    door: str
    passages: tuple[Passage, ...]
    forced: bool
    at: float


@dataclass(frozen=True, slots=True)
class Secured:
    """Notice (machine → owner): the door is shut and locked again, or its grant window passed unopened."""

    door: str
    cause: str
    at: float


Action = SetRelay | Emit | Feedback | Unlock | Opened | Secured


def compact(payload: dict[str, Any]) -> dict[str, Any]:
    """Drop fields that are None (schemas give them defaults; events stay small)."""
    return {key: value for key, value in payload.items() if value is not None}
