"""The door commands (controller → door agent): their names, argument schemas and limits.

The controller builds the arguments with these models and the door agent parses them with the same
models, strictly: an unknown key, a null, a wrong type, an id that is not a policy id or a value out
of range refuses the whole command (reason ``bad_args``). The command itself is verified elsewhere
(signature, expiry, nonce: ``protocol.messages.open_command`` and the agent's nonce store); this only
makes sure a signed but malformed request does nothing rather than something unintended.

============================  ===================================================================
``door.unlock``               ``{"door": id, "seconds"?: 1..60, "requested_by"?: id}``
``door.emergency_unlock``     one of ``{"all": true}``, ``{"doors": [id, ...]}``, ``{"area": id}``;
``door.lockdown``             optional ``"group": id`` (a label carried into ``door.mode_changed``)
``door.normal``
``door.forgive_passback``     ``{"area": id, "person"?: id}``
============================  ===================================================================

An argument that is not given is absent, never null.
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sekisho.protocol.catalogue import DoorMode
from sekisho.protocol.errors import Rejected
from sekisho.protocol.policy import Ident

UNLOCK: Final = "door.unlock"
EMERGENCY_UNLOCK: Final = "door.emergency_unlock"
LOCKDOWN: Final = "door.lockdown"
NORMAL: Final = "door.normal"
FORGIVE_PASSBACK: Final = "door.forgive_passback"

ModeCommand = Literal["door.emergency_unlock", "door.lockdown", "door.normal"]
# Which mode each mode command puts the selected doors in (the mode named in door.mode_changed).
MODE_OF: dict[ModeCommand, DoorMode] = {EMERGENCY_UNLOCK: "emergency_unlock", LOCKDOWN: "lockdown", NORMAL: "normal"}

MAX_UNLOCK_S: Final = 60
MAX_DOORS: Final = 256

# The reason code of an agent.command_rejected for arguments these models refuse.
BAD_ARGS = "bad_args"


class CommandArgs(BaseModel):
    """Arguments of one door command: strict types, no unknown keys, and no nulls on the wire."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def wire(self) -> dict[str, Any]:
        """Return the arguments as sent: JSON types, arguments not given left out (never null)."""
        return self.model_dump(mode="json", exclude_defaults=True)


class UnlockArgs(CommandArgs):
    """``door.unlock``: release one door once; seconds defaults to the door's own unlock_s."""

    door: Ident
    seconds: int | None = Field(default=None, ge=1, le=MAX_UNLOCK_S)
    requested_by: Ident | None = None


class Selection(CommandArgs):
    """Which doors a mode command is for: all, a list, or an area's; with an optional group label."""

    all: bool = False
    # Not strict: the wire has JSON arrays, code passes tuples.
    doors: tuple[Ident, ...] = Field(default=(), min_length=1, max_length=MAX_DOORS, strict=False)
    area: Ident | None = None
    group: Ident | None = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # the model's own type error says so
        chosen = [key for key in ("all", "doors", "area") if data.get(key) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of all, doors, area")
        if chosen == ["all"] and data["all"] is not True:
            raise ValueError("all must be true")
        return data

    @model_validator(mode="after")
    def _distinct(self) -> Selection:
        if len(set(self.doors)) != len(self.doors):
            raise ValueError("doors names a door twice")
        return self


class ForgiveArgs(CommandArgs):
    """``door.forgive_passback``: anti-passback forgiveness for an area (everyone, or one person)."""

    area: Ident
    person: Ident | None = None


A = TypeVar("A", bound=CommandArgs)

# The argument model of every door command, by command name.
ARGS: dict[str, type[CommandArgs]] = {
    UNLOCK: UnlockArgs,
    EMERGENCY_UNLOCK: Selection,
    LOCKDOWN: Selection,
    NORMAL: Selection,
    FORGIVE_PASSBACK: ForgiveArgs,
}


def parse_args(model: type[A], raw: Any) -> A:
    """Check received command arguments against their model; raise Rejected(bad_args) naming the first fault."""
    if isinstance(raw, dict):
        nulls = sorted(str(key) for key, value in raw.items() if value is None)
        if nulls:
            raise Rejected(BAD_ARGS, f"{nulls[0]} must not be null (leave it out)"[:300])
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "args"
        # A model validator's own message reads better without pydantic's "Value error, " in front.
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise Rejected(BAD_ARGS, f"{where}: {message}"[:300]) from err


def parse_unlock(raw: Any) -> UnlockArgs:
    """Check ``door.unlock`` arguments."""
    return parse_args(UnlockArgs, raw)


def parse_selection(raw: Any) -> Selection:
    """Check the door selection of ``door.emergency_unlock`` / ``door.lockdown`` / ``door.normal``."""
    return parse_args(Selection, raw)


def parse_forgive(raw: Any) -> ForgiveArgs:
    """Check ``door.forgive_passback`` arguments."""
    return parse_args(ForgiveArgs, raw)
