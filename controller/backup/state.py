"""What a controller database holds, in the terms a backup manifest and a restore report use."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, inspect, select, table, text
from sqlalchemy.sql import column

# Alembic's own bookkeeping: carried in the copy, but it is the schema revision, not a record.
_ALEMBIC = "alembic_version"


@dataclass(frozen=True, slots=True)
class StreamHead:
    """How far one agent's stored event stream reached."""

    max_seq: int
    contiguous_seq: int
    chain_length: int


@dataclass(slots=True)
class DatabaseState:
    """Row counts, stream heads, newest policy version, checkpoint head and schema revision of one database."""

    schema_revision: str | None = None
    tables: dict[str, int] = field(default_factory=dict)
    streams: dict[str, StreamHead] = field(default_factory=dict)
    policy_version: int = 0
    checkpoint_head: tuple[int, str] | None = None
    # From the agents table: what each agent last said in a heartbeat (only a live database has these).
    reported_policy: dict[str, int] = field(default_factory=dict)
    reported_next_seq: dict[str, int] = field(default_factory=dict)

    def manifest_fields(self) -> dict[str, Any]:
        """Return the parts of the state a backup manifest records."""
        return {
            "schema_revision": self.schema_revision,
            "tables": dict(sorted(self.tables.items())),
            "streams": {
                agent: {"max_seq": h.max_seq, "contiguous_seq": h.contiguous_seq, "chain_length": h.chain_length}
                for agent, h in sorted(self.streams.items())
            },
            "policy_version": self.policy_version,
            "checkpoint_head": None
            if self.checkpoint_head is None
            else {"n": self.checkpoint_head[0], "hash": self.checkpoint_head[1]},
        }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_state(conn: Connection) -> DatabaseState:
    """Read a database's state inside the caller's transaction (so it matches a dump of the same snapshot)."""
    state = DatabaseState()
    names = set(inspect(conn).get_table_names())
    if _ALEMBIC in names:
        state.schema_revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    for name in sorted(names - {_ALEMBIC}):
        state.tables[name] = int(conn.execute(select(func.count()).select_from(table(name))).scalar_one())
    if "streams" in names:
        streams = table(
            "streams", column("agent_id"), column("max_seq"), column("contiguous_seq"), column("chain_length")
        )
        for row in conn.execute(select(streams)):
            state.streams[str(row.agent_id)] = StreamHead(
                int(row.max_seq), int(row.contiguous_seq), int(row.chain_length)
            )
    if "policy_versions" in names:
        versions = table("policy_versions", column("version"))
        state.policy_version = int(conn.execute(select(func.max(versions.c.version))).scalar() or 0)
    if "checkpoints" in names:
        log = table("checkpoints", column("id"), column("hash"))
        head = conn.execute(select(log.c.id, log.c.hash).order_by(log.c.id.desc()).limit(1)).first()
        state.checkpoint_head = None if head is None else (int(head.id), str(head.hash))
    if "agents" in names:
        agents = table("agents", column("id"), column("status"), column("policy_version"), column("last_heartbeat"))
        for row in conn.execute(select(agents)):
            if (version := _int(row.policy_version)) is not None:
                state.reported_policy[str(row.id)] = version
            heartbeat = row.last_heartbeat
            if isinstance(heartbeat, str):  # a JSON column read through a bare table() comes back as text
                try:
                    heartbeat = json.loads(heartbeat)
                except ValueError:
                    heartbeat = None
            if isinstance(heartbeat, dict) and (next_seq := _int(heartbeat.get("next_seq"))) is not None:
                state.reported_next_seq[str(row.id)] = next_seq
    return state
