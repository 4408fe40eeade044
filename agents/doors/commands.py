"""Why the door agent refuses a door command whose arguments are well-formed (the reason codes of its
``agent.command_rejected``).

The command names, their argument models and limits, and the ``bad_args`` refusal of malformed
arguments are the wire contract shared with the controller: ``protocol.door_commands``. What is
left here depends on this agent's own doors and state.
"""

from __future__ import annotations

UNKNOWN_DOOR = "unknown_door"
UNKNOWN_AREA = "unknown_area"
NO_DOORS = "no_doors"
LOCKDOWN = "lockdown"
NOT_RECORDED = "not_recorded"
